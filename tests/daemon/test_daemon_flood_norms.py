"""A flood of junk runs that each send one Norms, against a real daemon process over real
ZeroMQ (issue 20, item 8): a real run arriving after it is admitted within seconds, not
after --run.evict-after-seconds, and a real run established before a second flood keeps
its place through it. Seconds from the clock, counts from /metrics."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from daemon_support import get
from live_daemon import LiveDaemon

from esper_telemetry import GroupNorm, Norms, encode
from esper_telemetry.daemon.aggregator import ESTABLISHED_AFTER_S

pytestmark = pytest.mark.slow

JUNK = 50_000
ADMITTED_WITHIN_S = 10.0
GROUPS = (GroupNorm("host", "host", 4, 1.0, 0, False, False),)


def flood(endpoint: str, tag: str) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)  # deliver everything before closing
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(endpoint)
        for i in range(JUNK):
            sock.send(encode(Norms(f"junk-{tag}-{i:05d}", 0, 1.0, 1, False, GROUPS, 1), seq=0))
        sock.close()
    finally:
        ctx.term()


class RealRun(threading.Thread):
    """A collector capturing every 0.1 s until stopped."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.stopped = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        seq = 0
        try:
            while not self.stopped.wait(0.1):
                sock.send(encode(Norms("real", 0, time.time(), seq, False, GROUPS, 1), seq=seq))
                seq += 1
        finally:
            sock.close()
            ctx.term()


def test_a_real_run_is_admitted_within_seconds_of_a_flood_of_runs_sending_norms(tmp_path):
    d = LiveDaemon(tmp_path / "d.log", "--run.evict-after-seconds=60")
    real = RealRun(d.endpoint)
    try:
        flood(d.endpoint, "a")
        s = d.scrape_until(
            lambda s: get(s, "esper_daemon_events_total") == JUNK, "the flood applied", 60.0
        )
        flood_done = time.monotonic()
        full = get(s, "esper_daemon_runs")
        real.start()
        s = d.scrape_until(
            lambda s: (get(s, "esper_captures_total", run="real") or 0) >= 1,
            "the real run admitted",
            timeout_s=ADMITTED_WITHIN_S,
        )
        admitted_after = time.monotonic() - flood_done
        print(f"admitted {admitted_after:.2f} s after a flood of {JUNK} runs ({full} held)")
        assert admitted_after < ADMITTED_WITHIN_S
        assert get(s, "esper_daemon_runs_evicted_total", reason="young") >= 1
        # Once established it keeps its place through a second flood: its captures go on
        # counting from where they were (an eviction would start them from zero).
        time.sleep(ESTABLISHED_AFTER_S + 1.0)
        before = get(d.scrape(), "esper_captures_total", run="real")
        evicted_before = get(d.scrape(), "esper_daemon_runs_evicted_total", reason="young")
        flood(d.endpoint, "b")
        s = d.scrape_until(
            lambda s: get(s, "esper_daemon_events_total") >= 2 * JUNK, "the second flood", 60.0
        )
        time.sleep(0.5)
        s = d.scrape()
        assert get(s, "esper_daemon_runs_evicted_total", reason="young") > evicted_before
        assert get(s, "esper_captures_total", run="real") > before
    finally:
        real.stopped.set()
        real.join(5)
        assert d.stop() == 0, d.log()
