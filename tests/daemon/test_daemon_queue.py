"""The bounded queue between receiver and aggregator."""

from __future__ import annotations

import asyncio

import pytest

from esper_telemetry.daemon.queue import EventQueue


def test_bounded_in_events_and_refuses_whole_messages():
    q = EventQueue(5)
    assert q.put([1, 2, 3]) is True
    assert q.put([4, 5, 6]) is False  # would make 6: refused whole, nothing queued
    assert len(q) == 3
    assert q.put([4, 5]) is True and len(q) == 5
    assert q.put([6]) is False
    assert q.get() == [1, 2, 3] and q.get() == [4, 5] and q.get() is None and len(q) == 0
    with pytest.raises(ValueError):
        EventQueue(0)


async def test_wait_returns_when_something_is_queued():
    q = EventQueue(4)
    waiter = asyncio.create_task(q.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    q.put([1])
    await asyncio.wait_for(waiter, 5)
    assert q.get() == [1]
    await asyncio.wait_for(q.wait(), 0.5) if len(q) else None
    waiter = asyncio.create_task(q.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # emptied again: waits for the next put
    waiter.cancel()
