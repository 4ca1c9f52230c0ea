"""One run's sharded steps, assembled over ranks: a step's sums of squares added once all ranks reported.

- A step is published when ``expected`` distinct ranks have reported it (the caller knows
  the world size). A rank that reports a step twice replaces its first report.
- A group's total is the sum over the ranks that had a gradient; ``None`` (no gradient)
  only if no rank had one.
- A step still short ``window_s`` after its first report is given up (``expire``), and so
  is the oldest one when ``max_pending`` steps already wait: a partial sum understates the
  norm, and a stale norm is safer than a wrong one. Both count in ``incomplete``.
- A step published or given up is remembered (the last ``closed_memory`` of them), so a
  straggler or a duplicate for it is dropped instead of opening a new pending step.

Pure: no clock (``now`` is passed in, monotonic seconds) and no knowledge of groups beyond
their keys (the aggregator passes its group records; tests pass names).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

__all__ = ["StepAssembly", "Added", "MAX_PENDING_STEPS", "CLOSED_MEMORY"]

# Sharded steps awaiting ranks, per run; the oldest is given up (counted incomplete) first.
MAX_PENDING_STEPS = 64
# Closed sharded steps remembered per run, so a straggler for one is not a new pending step.
CLOSED_MEMORY = 256

Shards = Sequence[Tuple[Hashable, Optional[float]]]


class Added(NamedTuple):
    """What one report did: the published step's totals (None while the step waits), and
    whether the oldest pending step was given up to make room for this one."""

    totals: Optional[Dict[Any, Optional[float]]]
    evicted: bool


class _Pending:
    __slots__ = ("since", "reports")

    def __init__(self, since: float) -> None:
        self.since = since
        self.reports: Dict[int, Shards] = {}


class StepAssembly:
    """Pending sharded steps of one run, keyed by step; single-threaded."""

    __slots__ = ("_window_s", "_max_pending", "_closed_memory", "_pending", "_closed",
                 "incomplete")

    def __init__(self, window_s: float, max_pending: int = MAX_PENDING_STEPS,
                 closed_memory: int = CLOSED_MEMORY) -> None:
        self._window_s = window_s
        self._max_pending = max_pending
        self._closed_memory = closed_memory
        self._pending: Dict[int, _Pending] = {}  # insertion order = age
        self._closed: "OrderedDict[int, None]" = OrderedDict()
        self.incomplete = 0  # steps given up, by the window or the cap

    def __len__(self) -> int:
        """Steps waiting for ranks."""
        return len(self._pending)

    def add(self, step: int, rank: int, shards: Shards, expected: int, now: float) -> Added:
        """Take ``rank``'s ``(key, sum of squares)`` pairs for ``step``, at time ``now``."""
        pending = self._pending.get(step)
        evicted = False
        if pending is None:
            if step in self._closed:
                return Added(None, False)  # a straggler or duplicate for a closed step
            if len(self._pending) >= self._max_pending:
                self._give_up(next(iter(self._pending)))
                evicted = True
            pending = self._pending[step] = _Pending(now)
        pending.reports[rank] = shards
        if len(pending.reports) < expected:
            return Added(None, evicted)
        self._close(step)
        totals: Dict[Any, Optional[float]] = {}
        for report in pending.reports.values():
            for key, sq in report:
                if sq is None:
                    totals.setdefault(key, None)
                else:
                    prev = totals.get(key)
                    totals[key] = sq if prev is None else prev + sq
        return Added(totals, evicted)

    def expire(self, now: float) -> List[int]:
        """Give up the steps still short ``window_s`` after their first report; those steps."""
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
