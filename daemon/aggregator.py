"""Per-run, per-group state built from events: the only place events change anything.

Semantics (docs/daemon.md has the operator's version):

- A run exists from its first accepted event until every rank it has heard from said
  goodbye (ended at once) or until it has been quiet for the TTL (expired). Its counters
  only go up while it lives; a run that comes back starts again from zero.
- Replicated groups (``sharded`` false) take the capture of the highest step, whichever rank
  sent it (a rank going back to a lower step is that rank restarting, and is taken).
- Sharded groups: a step's sums of squares are added over ranks and published once the
  expected number of ranks reported that step: the world size of the latest ``Hello``, or,
  when the daemon has seen no ``Hello`` (it started after the job), the highest rank heard
  plus one. A step still short after the shard window is dropped and counted in
  ``incomplete_steps``: a partial sum understates the norm, and a stale norm is safer
  than a wrong one. A rank that reports a step twice replaces its first report.
- Every set that input can grow is capped: runs, groups per run, ranks per run, violation
  and device-mismatch kinds, pending sharded steps. What a cap refuses is counted in
  ``DaemonStats.overflow``; what already exists is untouched.

Single-threaded: everything runs on the event loop; ``snapshot()`` is the one read path.
The clock is injected (monotonic seconds) so TTL and window tests need no sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

from esper_telemetry.events import (
    DeviceMismatch,
    Event,
    Goodbye,
    Heartbeat,
    Hello,
    IsolationViolation,
    Norms,
)

from .queue import EventQueue
from .snapshot import GroupSnapshot, RunSnapshot, Snapshot
from .stats import DaemonStats

__all__ = ["Aggregator", "Limits"]

_log = logging.getLogger(__name__)

# Distinct label values kept per group (violation kinds) and per run (mismatch kinds).
MAX_KINDS = 16
# Sharded steps awaiting ranks, per run; the oldest is given up (counted incomplete) first.
MAX_PENDING_STEPS = 64
# Closed sharded steps remembered per run, so a straggler for one is not a new pending step.
_CLOSED_MEMORY = 256
# Events applied per turn of the event loop before yielding to the receiver: twice the
# receiver's burst, so that in steady state the aggregator empties the queue every turn.
_TURN_EVENTS = 8192


class Limits:
    """The aggregator's caps and windows (seconds)."""

    __slots__ = ("max_runs", "max_groups_per_run", "max_ranks_per_run", "ttl_s", "shard_window_s")

    def __init__(
        self,
        max_runs: int = 100,
        max_groups_per_run: int = 128,
        max_ranks_per_run: int = 4096,
        ttl_s: float = 300.0,
        shard_window_s: float = 30.0,
    ) -> None:
        self.max_runs = max_runs
        self.max_groups_per_run = max_groups_per_run
        self.max_ranks_per_run = max_ranks_per_run
        self.ttl_s = ttl_s
        self.shard_window_s = shard_window_s


class _Group:
    __slots__ = ("role", "params", "isolated", "captured", "sq", "step", "rank", "nonfinite",
                 "violations", "violation_step")

    def __init__(self) -> None:
        self.role = "group"
        self.params: Optional[int] = None
        self.isolated = False
        self.captured = False
        self.sq: Optional[float] = None
        self.step = -1
        self.rank = -1      # the rank whose capture ``sq`` is (replicated groups)
        self.nonfinite = 0
        self.violations: Dict[str, int] = {}
        self.violation_step = -1


class _Pending:
    """One sharded step awaiting its ranks: each rank's (group, sq) pairs."""

    __slots__ = ("since", "reports")

    def __init__(self, since: float) -> None:
        self.since = since
        self.reports: Dict[int, List[Tuple[_Group, Optional[float]]]] = {}


class _Run:
    __slots__ = ("groups", "ranks", "max_rank", "world_size", "last_seen", "captures",
                 "last_step", "last_rank", "last_time", "dropped", "dropped_by_rank", "mismatch",
                 "incomplete", "pending", "closed")

    def __init__(self, now: float) -> None:
        self.groups: Dict[str, _Group] = {}
        self.ranks: Dict[int, float] = {}  # rank -> clock time last heard
        self.max_rank = -1
        self.world_size = 0  # from the latest Hello; 0 when unknown
        self.last_seen = now
        self.captures = 0
        self.last_step = -1
        self.last_rank = -1
        self.last_time = 0.0
        self.dropped = 0
        self.dropped_by_rank: Dict[int, int] = {}  # latest cumulative count per rank
        self.mismatch: Dict[str, int] = {}
        self.incomplete = 0
        self.pending: Dict[int, _Pending] = {}  # insertion order = age
        self.closed: "OrderedDict[int, None]" = OrderedDict()


class Aggregator:
    """Applies events to run state; feeds on an ``EventQueue``; renders ``Snapshot``s."""

    def __init__(
        self,
        queue: EventQueue,
        stats: DaemonStats,
        limits: Limits,
        clock: Callable[[], float],
        logger: logging.Logger = _log,
    ) -> None:
        self._queue = queue
        self._stats = stats
        self._limits = limits
        self._clock = clock
        self._log = logger
        self._runs: Dict[str, _Run] = {}
        self._now = clock()
        self._handlers: Dict[type, Callable[[Event], None]] = {
            Norms: self._norms,  # type: ignore[dict-item]
            Heartbeat: self._heartbeat,  # type: ignore[dict-item]
            Hello: self._hello,  # type: ignore[dict-item]
            IsolationViolation: self._violation,  # type: ignore[dict-item]
            DeviceMismatch: self._mismatch,  # type: ignore[dict-item]
            Goodbye: self._goodbye,  # type: ignore[dict-item]
        }

    # --- feeding -----------------------------------------------------------------------

    async def run(self) -> None:
        """Apply queued messages forever, yielding to the loop between bounded turns."""
        while True:
            await self._queue.wait()
            self.drain(_TURN_EVENTS)
            await asyncio.sleep(0)

    def drain(self, budget: int) -> int:
        """Apply queued messages until about ``budget`` events were applied; returns the count."""
        self._now = self._clock()
        get = self._queue.get
        handlers = self._handlers
        done = 0
        while done < budget:
            events = get()
            if events is None:
                break
            try:
                for event in events:
                    handlers[type(event)](event)
            except Exception:  # a bug, never bad input (the codec validated it): stay up
                self._stats.rejected["internal"] += 1
                self._log.exception("internal error applying a message; it was dropped")
            done += len(events)
        self._stats.events += done
        return done

    def apply(self, events: List[Event]) -> None:
        """Apply one message's events now (tests and tools; the daemon goes via the queue)."""
        if not self._queue.put(events):
            raise OverflowError("queue full")
        self.drain(len(self._queue))

    def tick(self) -> None:
        """Expire quiet runs and ranks, and give up sharded steps past the window."""
        now = self._now = self._clock()
        cutoff = now - self._limits.ttl_s
        window_cutoff = now - self._limits.shard_window_s
        for name, run in list(self._runs.items()):
            if run.last_seen < cutoff:
                del self._runs[name]
                self._stats.expired_runs += 1
                self._log.info("run expired after %gs without events: %s",
                               self._limits.ttl_s, name)
                continue
            stale = [r for r, t in run.ranks.items() if t < cutoff]
            for r in stale:
                del run.ranks[r]
            if run.pending:
                late = [s for s, p in run.pending.items() if p.since < window_cutoff]
                for step in late:
                    self._close(run, step)
                    run.incomplete += 1

    # --- the run, its ranks, its groups ---------------------------------------------------

    def _run(self, name: str, rank: int) -> Optional[_Run]:
        """The run, created if there is room, with ``rank`` marked as heard; None if refused."""
        run = self._runs.get(name)
        now = self._now
        if run is None:
            if len(self._runs) >= self._limits.max_runs:
                self._stats.overflow["runs"] += 1
                return None
            run = self._runs[name] = _Run(now)
        ranks = run.ranks
        if rank not in ranks:
            if len(ranks) >= self._limits.max_ranks_per_run:
                self._stats.overflow["ranks"] += 1
                return None
            if rank > run.max_rank:
                run.max_rank = rank
        ranks[rank] = now
        run.last_seen = now
        return run

    def _group(self, run: _Run, name: str) -> Optional[_Group]:
        group = run.groups.get(name)
        if group is None:
            if len(run.groups) >= self._limits.max_groups_per_run:
                self._stats.overflow["groups"] += 1
                return None
            group = run.groups[name] = _Group()
        return group

    # --- one handler per event type ------------------------------------------------------

    def _norms(self, ev: Norms) -> None:
        # The hot path: tuple unpacking instead of attribute access, and the common case
        # (a known run and rank) inline rather than through _run().
        run_name, rank, time_, step, _skipped, group_norms = ev
        run = self._runs.get(run_name)
        if run is not None and rank in run.ranks:
            run.ranks[rank] = run.last_seen = self._now
        else:
            run = self._run(run_name, rank)
            if run is None:
                return
        run.captures += 1
        if step >= run.last_step or rank == run.last_rank:
            run.last_step = step
            run.last_rank = rank
            run.last_time = time_
        groups = run.groups
        shards = None
        for name, role, params, sq, nonfinite, sharded, isolated in group_norms:
            group = groups.get(name)
            if group is None:
                group = self._group(run, name)
                if group is None:
                    continue
            group.role = role
            group.params = params
            group.isolated = isolated
            if nonfinite:
                group.nonfinite += 1
            if sharded:
                if shards is None:
                    shards = []
                shards.append((group, sq))
            elif step >= group.step or rank == group.rank:
                # Ranks' batches interleave: an older step from another rank must not move
                # the norm backwards; the same rank going back is that rank restarting.
                group.sq = sq
                group.step = step
                group.rank = rank
                group.captured = True
        if shards is not None:
            self._shard(run, rank, step, shards)

    def _shard(self, run: _Run, rank: int, step: int,
               shards: List[Tuple[_Group, Optional[float]]]) -> None:
        pending = run.pending.get(step)
        if pending is None:
            if step in run.closed:
                return  # a straggler or duplicate for a step already published or given up
            if len(run.pending) >= MAX_PENDING_STEPS:
                oldest = next(iter(run.pending))
                self._close(run, oldest)
                run.incomplete += 1
                self._stats.overflow["pending_steps"] += 1
            pending = run.pending[step] = _Pending(self._now)
        pending.reports[rank] = shards
        expected = run.world_size or max(run.max_rank + 1, len(run.ranks))
        if len(pending.reports) >= expected:
            self._close(run, step)
            totals: Dict[_Group, Optional[float]] = {}
            for report in pending.reports.values():
                for group, sq in report:
                    if sq is None:
                        totals.setdefault(group, None)
                    else:
                        prev = totals.get(group)
                        totals[group] = sq if prev is None else prev + sq
            for group, sq in totals.items():
                group.sq = sq
                group.step = step
                group.captured = True

    def _close(self, run: _Run, step: int) -> None:
        run.pending.pop(step, None)
        closed = run.closed
        closed[step] = None
        if len(closed) > _CLOSED_MEMORY:
            closed.popitem(last=False)

    def _hello(self, ev: Hello) -> None:
        run = self._run(ev.run, ev.rank)
        if run is None:
            return
        run.world_size = ev.world_size
        for decl in ev.groups:
            group = self._group(run, decl.name)
            if group is not None:
                group.role = decl.role
                group.params = decl.params
                group.isolated = decl.isolated
        self._log.info("collector hello: run=%s rank=%d world_size=%d host=%s pid=%d "
                       "library=%s torch=%s groups=%d", ev.run, ev.rank, ev.world_size,
                       ev.hostname, ev.pid, ev.library_version, ev.torch_version,
                       len(ev.groups))

    def _heartbeat(self, ev: Heartbeat) -> None:
        run = self._run(ev.run, ev.rank)
        if run is None:
            return
        by_rank = run.dropped_by_rank
        if ev.rank not in by_rank and len(by_rank) >= self._limits.max_ranks_per_run:
            # Full of ranks that have left (their drops are already summed): forget one,
            # or this rank's running total would be added again at every heartbeat.
            gone = next((r for r in by_rank if r not in run.ranks), None)
            if gone is None:
                self._stats.overflow["ranks"] += 1
                return
            del by_rank[gone]
        prev = by_rank.get(ev.rank, 0)
        # A cumulative count that went down is a restarted collector counting from zero.
        run.dropped += ev.dropped - prev if ev.dropped >= prev else ev.dropped
        by_rank[ev.rank] = ev.dropped

    def _violation(self, ev: IsolationViolation) -> None:
        run = self._run(ev.run, ev.rank)
        if run is None:
            return
        group = self._group(run, ev.group)
        if group is None:
            return
        if not _bump(group.violations, ev.kind):
            self._stats.overflow["label_values"] += 1
        # The kind cap bounds label values, not evidence: a refused kind still marks its step.
        if ev.step > group.violation_step:
            group.violation_step = ev.step
        self._log.debug("isolation violation: run=%s group=%s kind=%s step=%d: %s",
                        ev.run, ev.group, ev.kind, ev.step, ev.evidence)

    def _mismatch(self, ev: DeviceMismatch) -> None:
        run = self._run(ev.run, ev.rank)
        if run is None:
            return
        if not _bump(run.mismatch, ev.kind):
            self._stats.overflow["label_values"] += 1

    def _goodbye(self, ev: Goodbye) -> None:
        run = self._runs.get(ev.run)
        if run is None:
            return
        run.ranks.pop(ev.rank, None)
        if not run.ranks:
            del self._runs[ev.run]
            self._stats.ended_runs += 1
            self._log.info("run ended (every rank said goodbye): %s", ev.run)

    # --- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Runs held."""
        return len(self._runs)

    def snapshot(self) -> Snapshot:
        """Everything a scrape shows, detached from live state (call on the loop thread)."""
        cutoff = self._clock() - self._limits.ttl_s
        runs = []
        for name, run in self._runs.items():
            groups = tuple(
                GroupSnapshot(gname, g.role, g.params, g.isolated, g.captured, g.sq, g.step,
                              g.nonfinite, dict(g.violations), g.violation_step)
                for gname, g in run.groups.items()
            )
            collectors = sum(1 for t in run.ranks.values() if t >= cutoff)
            runs.append(RunSnapshot(name, run.captures, run.last_step, run.last_time,
                                    collectors, run.dropped, run.incomplete,
                                    dict(run.mismatch), groups))
        s = self._stats
        return Snapshot(tuple(runs), s.messages, s.events, dict(s.rejected), dict(s.overflow),
                        s.expired_runs, s.ended_runs, len(self._queue), self._queue.capacity)


def _bump(counts: Dict[str, int], key: str) -> bool:
    """Count one ``key``; False (nothing counted) if it is new and ``counts`` is full."""
    n = counts.get(key)
    if n is None:
        if len(counts) >= MAX_KINDS:
            return False
        n = 0
    counts[key] = n + 1
    return True
