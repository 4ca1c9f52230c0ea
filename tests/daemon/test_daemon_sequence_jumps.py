"""Loss accounting cannot be poisoned (issue 20, item 3): a message number no collector
could have reached is not believed. One message numbered 2**63-1 once set
esper_messages_lost_total to 9.2e18 and hid every later real loss."""

from __future__ import annotations

import pytest
import zmq
from daemon_support import get
from live_daemon import live_daemon

from esper_telemetry import Heartbeat, encode
from esper_telemetry.daemon.sequence import BURST_MESSAGES, MAX_MESSAGES_PER_S, Sequences

MAX_INT64 = (1 << 63) - 1


def sequences() -> Sequences:
    return Sequences(lambda run, rank: True, max_runs=4, max_ranks_per_run=4)


def test_a_jump_no_collector_could_make_is_not_counted_and_the_sequence_goes_on():
    s = sequences()
    for seq in range(100):
        s.observe_message("r", 0, seq, now=1.0)
    s.observe_message("r", 0, MAX_INT64, now=1.0)
    assert s.lost() == {("r", 0): 0} and s.implausible == 1
    s.observe_message("r", 0, 100, now=1.0)  # the collector's next number: nothing lost
    s.observe_message("r", 0, 103, now=1.0)  # 101 and 102 were
    assert s.lost() == {("r", 0): 2} and s.implausible == 1


def test_losses_counted_draw_on_an_allowance_that_refills_with_time():
    s = sequences()
    big = BURST_MESSAGES * 4 // 5
    s.observe_message("r", 0, 0, now=10.0)
    s.observe_message("r", 0, 1 + big, now=10.0)  # within the burst: counted
    assert s.lost() == {("r", 0): big}
    s.observe_message("r", 0, 2 + 2 * big, now=10.0)  # the burst is spent: not believed
    assert s.lost() == {("r", 0): big} and s.implausible == 1
    # A second later a collector could have sent MAX_MESSAGES_PER_S more: believed again.
    assert big <= MAX_MESSAGES_PER_S
    s.observe_message("r", 0, 2 + 2 * big, now=11.0)
    assert s.lost() == {("r", 0): 2 * big} and s.implausible == 1


def test_a_restart_numbered_past_the_allowance_starts_a_new_sequence_with_nothing_lost():
    s = sequences()
    s.observe_message("r", 0, MAX_INT64 - 5, now=1.0)  # a first message sets the baseline
    s.observe_message("r", 0, 7, now=1.0)  # lower: a restart; 7 numbers lost before it
    assert s.lost() == {("r", 0): 7}
    s.observe_message("r", 0, 10 * BURST_MESSAGES, now=1.0)  # not believed
    s.observe_message("r", 0, 8, now=1.0)
    assert s.lost() == {("r", 0): 7} and s.implausible == 1
    s.observe_message("r", 0, 100, now=1.0)
    assert s.lost() == {("r", 0): 7 + 91}


@pytest.mark.slow
def test_a_real_daemon_keeps_counting_real_losses_after_a_poisoned_number(tmp_path):
    frames = [encode(Heartbeat("poisoned", 0, 1.0, 1, 0, 0, 0), seq=n) for n in range(100)]
    frames.append(encode(Heartbeat("poisoned", 0, 1.0, 1, 0, 0, 0), seq=MAX_INT64))
    # The collector goes on from 100; 150-159 never arrive.
    frames += [
        encode(Heartbeat("poisoned", 0, 1.0, 1, 0, 0, 0), seq=n)
        for n in range(100, 200)
        if not 150 <= n < 160
    ]
    ctx = zmq.Context()
    with live_daemon(tmp_path / "d.log") as d:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.endpoint)
        try:
            for frame in frames:
                sock.send(frame)
            s = d.scrape_until(
                lambda s: get(s, "esper_daemon_events_total") == len(frames), "every message"
            )
        finally:
            sock.close()
            ctx.term()
    assert get(s, "esper_messages_lost_total", run="poisoned", rank="0") == 10
    assert get(s, "esper_daemon_implausible_sequence_numbers_total") == 1
