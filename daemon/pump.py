"""The pump: feeds the aggregator from the queue, with the clock that tells it the time.

On the event loop, like both of its ends (the receiver fills the queue, the web server reads
the aggregator's snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .aggregator import Aggregator
from .queue import EventQueue
from .stats import DaemonStats

__all__ = ["Pump"]

_log = logging.getLogger("esper_telemetry.daemon")

# Events applied per turn of the event loop before yielding to the receiver: twice the
# receiver's burst, so that in steady state the pump empties the queue every turn.
_TURN_EVENTS = 8192


class Pump:
    """Feeds the aggregator: queued messages with the time they are applied, and ticks.

    On the event loop, like both of its ends. A message that makes the aggregator raise (a
    daemon bug, never bad input: the codec validated it) is dropped, counted as
    ``rejected{reason="internal"}`` (a join of lone captures as the messages it holds) and
    logged; the daemon stays up.
    """

    def __init__(
        self,
        queue: EventQueue,
        aggregator: Aggregator,
        stats: DaemonStats,
        clock: Callable[[], float],
        logger: logging.Logger = _log,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._queue = queue
        self._aggregator = aggregator
        self._stats = stats
        self._clock = clock
        self._wall = wall  # unix time, which dates captures at each tick
        self._log = logger

    async def run(self) -> None:
        """Apply queued messages forever, yielding to the loop between bounded turns."""
        while True:
            await self._queue.wait()
            self.drain(_TURN_EVENTS)
            await asyncio.sleep(0)

    def drain(self, budget: int) -> int:
        """Apply queued messages until about ``budget`` events were applied; returns the count."""
        now = self._clock()
        apply_batch = self._aggregator.apply_batch
        done = 0
        for events in self._queue.take(budget):
            try:
                apply_batch(events, now)
            except Exception:
                # One per message (a receiver's join of lone captures holds several).
                self._stats.rejected["internal"] += getattr(events, "messages", 1)
                self._log.exception("internal error applying a message; it was dropped")
            done += len(events)
        return done

    async def tick_every(self, interval_s: float) -> None:
        """Move the aggregator's time on every ``interval_s`` seconds, forever."""
        while True:
            await asyncio.sleep(interval_s)
            self._aggregator.tick(self._clock(), self._wall())
