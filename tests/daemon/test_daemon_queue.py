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


def test_take_gives_whole_messages_until_the_budget_in_order():
    q = EventQueue(100)
    for m in ([1, 2], [3], [4, 5, 6], [7]):
        q.put(m)
    assert q.take(3) == [[1, 2], [3]] and len(q) == 4  # 3 events reach the budget
    assert q.take(1) == [[4, 5, 6]] and len(q) == 1  # at least one whole message
    assert q.take(100) == [[7]] and len(q) == 0
    assert q.take(5) == [] and q.get() is None
    assert q.put([8]) and q.take(1) == [[8]] and len(q) == 0


async def test_a_waiter_wakes_for_a_put_after_the_queue_was_emptied_by_take():
    q = EventQueue(10)
    q.put([1])
    q.put([2])  # no second wake-up needed: the queue was not empty
    await asyncio.wait_for(q.wait(), 0.5)
    assert q.take(10) == [[1], [2]]
    waiter = asyncio.create_task(q.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    q.put([3])
    await asyncio.wait_for(waiter, 5)
    q.clear()
    waiter = asyncio.create_task(q.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # cleared: waits again
    q.put([4])
    await asyncio.wait_for(waiter, 5)
