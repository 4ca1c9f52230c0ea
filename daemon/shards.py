"""One run's sharded steps, assembled over ranks: a step's sums of squares added once all
ranks reported.

- A step is published when ``expected`` distinct ranks have reported it (the caller knows
  the world size). A rank's first report of a step counts; a repeat of it (a restarted
  rank replaying the step) is dropped and counted in ``dropped_reports``.
- ``expected`` 0 means the world size is not known yet (a daemon that started after the
  job's ``Hello``s, a collector older than schema 3): the step waits, counted once in
  ``waited``, and is never published on a guess. ``settle`` publishes what the world size,
  once known, completes; a waiting step that a rank outside that world reported to is
  given up.
- Bounded in bytes whatever the world size: a pending step holds its running sums (one per
  group) and a bit per rank, never the ranks' reports, so a 4,096-rank job with 128
  sharded groups and a lagging rank holds kilobytes per step, not the ~9 KB per report
  (37 MB per step) that keeping the reports took.
- A group's total is the sum over the ranks that had a gradient; ``None`` (no gradient)
  only if no rank had one.
- A step that no rank reported to for ``window_s`` is given up (``expire``), and so is the
  oldest one when ``max_pending`` steps already wait: a partial sum understates the norm,
  and a stale norm is safer than a wrong one. Both count in ``incomplete``. The window runs
  from the step's latest report, not its first: a daemon reading a backlog (a 4,096-rank
  job that sent its steps in one message per rank) keeps every step whose parts still
  arrive, and a step a dead rank holds up is given up ``window_s`` after the others.
- A step published or given up is remembered (the last ``closed_memory`` of them), so a
  straggler or a duplicate for it is dropped (counted in ``dropped_reports``) instead of
  opening a new pending step.

Pure: no clock (``now`` is passed in, monotonic seconds) and no knowledge of groups beyond
their keys (the aggregator passes its group records; tests pass names).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

__all__ = ["StepAssembly", "Added", "MAX_PENDING_STEPS", "CLOSED_MEMORY"]

# Sharded steps awaiting ranks, per run; the oldest is given up (counted incomplete) first.
# A collector sends up to 256 steps in one message (its publisher's largest batch): every
# one of them opens at once when that rank's message is read first.
MAX_PENDING_STEPS = 256
# Closed sharded steps remembered per run, so a straggler for one is not a new pending step.
CLOSED_MEMORY = 1024

Shards = Sequence[tuple[Hashable, float | None]]


class Added(NamedTuple):
    """What one report did: the published step's totals (None while the step waits), and
    whether the oldest pending step was given up to make room for this one."""

    totals: dict[Any, float | None] | None
    evicted: bool


class _Pending:
    __slots__ = ("since", "seen", "count", "totals", "waited")

    def __init__(self, since: float) -> None:
        self.since = since
        self.waited = False  # counted in StepAssembly.waited
        self.seen = 0  # bit i: the rank with index i reported (StepAssembly._index)
        self.count = 0
        self.totals: dict[Any, float | None] = {}


class StepAssembly:
    """Pending sharded steps of one run, keyed by step; single-threaded.

    ``max_ranks`` is the run's rank cap (``--limits.max-ranks-per-run``): the rank index
    holds up to twice that many ranks before it gives up what waits and starts again.
    """

    __slots__ = (
        "_window_s",
        "_max_pending",
        "_closed_memory",
        "_max_ranks",
        "_pending",
        "_closed",
        "_index",
        "incomplete",
        "dropped_reports",
        "waited",
    )

    def __init__(
        self,
        window_s: float,
        max_ranks: int,
        max_pending: int = MAX_PENDING_STEPS,
        closed_memory: int = CLOSED_MEMORY,
    ) -> None:
        self._window_s = window_s
        self._max_pending = max_pending
        self._closed_memory = closed_memory
        self._max_ranks = max_ranks
        self._pending: dict[int, _Pending] = {}  # insertion order = age
        self._closed: OrderedDict[int, None] = OrderedDict()
        # A rank's bit in the pending steps' masks; emptied whenever nothing is pending, so
        # it holds at most the ranks heard from since then (see add).
        self._index: dict[int, int] = {}
        self.incomplete = 0  # steps given up, by the window or the cap
        # Reports dropped: a rank's repeat of a pending step, or any report for a step
        # already published or given up (a straggler).
        self.dropped_reports = 0
        self.waited = 0  # steps that had to wait because the world size was not known

    def __len__(self) -> int:
        """Steps waiting for ranks."""
        return len(self._pending)

    def add(self, step: int, rank: int, shards: Shards, expected: int, now: float) -> Added:
        """Take ``rank``'s ``(key, sum of squares)`` pairs for ``step``, at time ``now``."""
        pending = self._pending.get(step)
        evicted = False
        if pending is None:
            if step in self._closed:
                self.dropped_reports += 1  # a straggler or a repeat for a closed step
                return Added(None, False)
            if len(self._pending) >= self._max_pending:
                self._give_up(next(iter(self._pending)))
                evicted = True
            if not self._pending:
                self._index.clear()
            pending = self._pending[step] = _Pending(now)
        if not expected and not pending.waited:
            pending.waited = True
            self.waited += 1
        index = self._index.get(rank)
        if index is None:
            if len(self._index) >= 2 * self._max_ranks:
                # Only ranks that come and go while steps never complete get here: give up
                # what waits, this step included (counted), and start the index again.
                for old in list(self._pending):
                    self._give_up(old)
                self._index.clear()
                return Added(None, True)
            index = self._index[rank] = len(self._index)
        bit = 1 << index
        if pending.seen & bit:
            self.dropped_reports += 1
            return Added(None, evicted)
        pending.seen |= bit
        pending.count += 1
        pending.since = now  # the window runs from the latest report
        totals = pending.totals
        for key, sq in shards:
            if sq is None:
                totals.setdefault(key, None)
            else:
                prev = totals.get(key)
                totals[key] = sq if prev is None else prev + sq
        if pending.count < expected or not expected:
            return Added(None, evicted)
        self._close(step)
        return Added(totals, evicted)

    def settle(self, expected: int) -> list[tuple[int, dict[Any, float | None]]]:
        """The world size is now ``expected``: the waiting steps it completes, as (step,
        totals) in the order they opened, closed; a waiting step that a rank outside
        ``range(expected)`` reported to is given up (counted in ``incomplete``)."""
        outside = 0
        for rank, index in self._index.items():
            if rank >= expected:
                outside |= 1 << index
        done = []
        for step, pending in list(self._pending.items()):
            if pending.seen & outside:
                self._give_up(step)
            elif pending.count >= expected:
                self._close(step)
                done.append((step, pending.totals))
        return done

    def expire(self, now: float) -> list[int]:
        """Give up the steps no rank reported to for ``window_s``; those steps."""
        cutoff = now - self._window_s
        late = [s for s, p in self._pending.items() if p.since < cutoff]
        for step in late:
            self._give_up(step)
        return late

    def _give_up(self, step: int) -> None:
        self._close(step)
        self.incomplete += 1

    def _close(self, step: int) -> None:
        self._pending.pop(step, None)
        closed = self._closed
        closed[step] = None
        if len(closed) > self._closed_memory:
            closed.popitem(last=False)
