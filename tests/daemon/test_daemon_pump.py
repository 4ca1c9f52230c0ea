"""The pump, the wiring between the queue and the aggregator: messages applied at the clock's
time, bounded turns, periodic ticks, and a daemon bug costing one message."""

from __future__ import annotations

import asyncio
import logging

import pytest
from daemon_support import heartbeat, host_seed, make_limits, wait_for

from esper_telemetry.daemon.aggregator import Aggregator
from esper_telemetry.daemon.pump import Pump
from esper_telemetry.daemon.queue import EventQueue
from esper_telemetry.daemon.stats import DaemonStats


@pytest.fixture
def wired(clock):
    stats = DaemonStats()
    queue = EventQueue(1 << 16)
    agg = Aggregator(make_limits(ttl_s=60.0), stats)
    pump = Pump(queue, agg, stats, clock, logging.getLogger("test.pump"))
    return queue, agg, stats, pump


def runs(agg):
    return {r.name: r for r in agg.snapshot().runs}


def test_messages_are_applied_at_the_pumps_clock_time(wired, clock):
    queue, agg, stats, pump = wired
    queue.put([host_seed(run="a", rank=0)])
    assert pump.drain(100) == 1
    clock.advance(61.0)
    queue.put([heartbeat(run="b")])
    pump.drain(100)
    # Applied 61 s later by the clock: run a's only rank is past the 60 s TTL.
    assert runs(agg)["a"].collectors == 0 and runs(agg)["b"].collectors == 1
    assert stats.events == 2 and len(queue) == 0


def test_a_turn_stops_once_the_budget_is_spent_on_whole_messages(wired):
    queue, agg, stats, pump = wired
    for step in range(3):
        queue.put([host_seed(step=step), host_seed(step=step)])
    assert pump.drain(3) == 4  # two whole messages: a message is never split
    assert len(queue) == 2 and stats.events == 4
    assert runs(agg)["r"].last_step == 1


def test_a_daemon_bug_drops_that_message_only_and_is_counted(wired, caplog):
    queue, agg, stats, pump = wired
    queue.put([object()])  # not an event: only a daemon bug could queue this
    queue.put([host_seed(host_sq=25.0)])
    with caplog.at_level(logging.ERROR, "test.pump"):
        assert pump.drain(100) == 2
    assert stats.rejected["internal"] == 1
    assert {g.name: g.sq for g in runs(agg)["r"].groups}["host"] == 25.0
    assert "internal error applying a message" in caplog.text


async def test_run_consumes_the_queue_until_cancelled(wired):
    queue, agg, stats, pump = wired
    task = asyncio.create_task(pump.run())
    queue.put([host_seed(step=i) for i in range(3)])
    queue.put([host_seed(step=9, host_sq=81.0)])
    await wait_for(lambda: stats.events == 4, 5, "four events applied")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {g.name: g.sq for g in runs(agg)["r"].groups}["host"] == 81.0 and len(queue) == 0


async def test_ticks_move_the_aggregators_time_on_from_the_clock(wired, clock):
    queue, agg, stats, pump = wired
    queue.put([host_seed()])
    pump.drain(100)
    task = asyncio.create_task(pump.tick_every(0.01))
    try:
        await asyncio.sleep(0.05)
        assert len(agg) == 1  # the clock has not moved: no tick expires anything
        clock.advance(61.0)
        await wait_for(lambda: len(agg) == 0, 5, "the run to expire on a tick")
        assert stats.expired_runs == 1
    finally:
        task.cancel()


def test_a_daemon_bug_on_joined_captures_counts_every_message_they_held(wired, monkeypatch):
    from esper_telemetry import encode
    from esper_telemetry.daemon.aggregator import Aggregator
    from esper_telemetry.daemon.fastdecode import columns

    queue, agg, stats, pump = wired
    frames = [encode([host_seed(step=s)], seq=s) for s in range(10, 13)]
    joined = columns(b"".join(frames), 3, 1, True)
    assert joined is not None and joined.messages == 3

    def bug(self, events):
        raise RuntimeError("a daemon bug")

    monkeypatch.setattr(Aggregator, "_columns", bug)
    queue.put(joined)
    pump.drain(100)
    assert stats.rejected["internal"] == 3
