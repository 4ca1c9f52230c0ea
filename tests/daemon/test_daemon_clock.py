"""Staleness by the daemon's clock (issue 20, item 4), against a real daemon process: ranks
whose clocks are 2 h behind, 2 h ahead, at 1970, at 2100 and at 1e300 never move
esper_last_capture_timestamp_seconds off the time the daemon received the capture."""

from __future__ import annotations

import time

import pytest
import zmq
from daemon_support import get
from live_daemon import live_daemon

from esper_telemetry import GroupNorm, Norms, encode

pytestmark = pytest.mark.slow

# The clocks of ranks 0-5: right, 2 h behind, 2 h ahead, 1970, 2100, absurd.
CLOCKS = (0.0, -7200.0, 7200.0, None, 4_102_444_800.0, 1e300)
ROUNDS = 6
# Float rounding of the daemon's unix offset and the exposition: far below a scrape's time.
SLACK_S = 0.01


def collector_time(rank: int) -> float:
    clock = CLOCKS[rank]
    if clock is None:
        return 0.0
    return clock if clock > 1e9 else time.time() + clock


def test_capture_time_is_the_daemons_whatever_the_collectors_clocks_say(tmp_path):
    ctx = zmq.Context()
    with live_daemon(tmp_path / "d.log") as d:
        socks = []
        for _ in CLOCKS:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(d.endpoint)
            socks.append(sock)
        try:
            stamps = []
            for step in range(ROUNDS):
                before = time.time()
                # Each round a different rank's capture comes last (the one a run's latest
                # capture time used to be read from).
                order = [(step + i) % len(CLOCKS) for i in range(len(CLOCKS))]
                for rank in order:
                    event = Norms(
                        "skew",
                        rank,
                        collector_time(rank),
                        step,
                        False,
                        (GroupNorm("host", "host", 4, 1.0, 0, False, False),),
                        len(CLOCKS),
                    )
                    socks[rank].send(encode(event, seq=step))
                applied = (step + 1) * len(CLOCKS)
                s = d.scrape_until(
                    lambda s, n=applied: get(s, "esper_daemon_events_total") == n, f"round {step}"
                )
                after = time.time()
                stamp = get(s, "esper_last_capture_timestamp_seconds", run="skew")
                assert before - SLACK_S <= stamp <= after + SLACK_S, (step, before, stamp, after)
                stamps.append(stamp)
                time.sleep(0.2)
        finally:
            for sock in socks:
                sock.close()
            ctx.term()
    assert stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] < 10.0  # seconds apart, not hours
