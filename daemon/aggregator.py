"""Per-run, per-group state built from events: the only place events change anything.

Semantics (docs/daemon.md has the operator's version):

- A run exists from its first accepted event until every rank it has heard from said
  goodbye (ended) or until it has been quiet for the TTL (expired). An ended run is kept,
  as it was, for the ended-retention time (so its final values reach a scrape), marked
  ended; an expired one goes at once. Its counters only go up while it lives; a run that
  comes back (any event but a goodbye, also during the retention) starts again from zero.
- Admission: when the run table is full, a new run takes the place of, in this order, the
  ended run that ended first, the longest-idle run that never sent norms, the longest-idle
  run with norms once it has been idle for ``evict_after_s``, or the longest-idle young run
  once quiet for ``YOUNG_IDLE_S`` (young: with norms, heard from for less than
  ``ESTABLISHED_AFTER_S``; a burst of junk names is); each counted in ``DaemonStats.evicted``
  by that reason. Only when none of them exists is the new run refused
  (``overflow["runs"]``): a flood of junk run names, each sending anything for less than
  ``ESTABLISHED_AFTER_S``, cannot lock out a collector that arrives later, nor push out an
  established run that is still sending.
- Replicated groups (``sharded`` false) take the capture of the highest step, whichever rank
  sent it (a rank going back to a lower step is that rank restarting, and is taken).
- Time is the daemon's: a run's latest capture is dated when it was applied (``now``), in
  unix seconds by the offset ``tick`` is given, never by the collector's clock (one rank's
  clock 2 h off made the run's capture time jump by 2 h from step to step; 1e300 was
  accepted). The collector's time of the run's latest capture is kept as information.
- Sharded groups: a step's sums of squares are added over ranks (``shards.py``) and
  published once the run's world size of ranks reported that step: the latest world size
  announced, by a ``Hello`` or by a ``Norms`` (schema 3 carries it in every capture, so a
  daemon that started after the job knows it from the first one). While no world size is
  known (only collectors older than schema 3, and no ``Hello`` seen) a step waits, counted
  in ``DaemonStats.world_unknown_steps``, and is never published on a guess. A step still
  short after the shard window is dropped and counted in ``incomplete_steps``.
- The world: an event from a rank at or past the run's known world size, a ``Hello`` or
  ``Norms`` whose own world size does not hold its rank, or one announcing a world above
  ``max_ranks_per_run`` is refused whole, counted in ``DaemonStats.refused`` by reason. A
  new world size drops the ranks outside it.
- A group is stale from a ``DeviceMismatch`` of kind ``stale`` for it (its collector can
  no longer follow it) until a ``moved`` for it (followed again) or a ``Hello`` declaring
  it (a collector attaching anew). Its captures are still applied, but while it is stale
  the exporter shows no norm, gradient flag or ratio for it: those numbers mean nothing.
- Sums of squares are taken as they come, +Inf and NaN included (a group holding
  non-finite gradients); a sharded sum with one of them is +Inf or NaN too.
- Every set that input can grow is capped: runs, groups per run, ranks per run, violation
  and device-mismatch kinds, pending sharded steps. What a cap refuses is counted in
  ``DaemonStats.overflow``; what already exists is untouched.

A state machine: ``apply(event, now)`` and ``apply_batch(events, now)`` feed it,
``tick(now)`` moves time on (expiry, the shard window), ``snapshot()`` reads it. No clock,
no queue, no event loop of its own: ``now`` (monotonic seconds) comes from the caller, and
the pump that feeds it from the queue is the daemon's wiring (``app.py``). Single-threaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from esper_telemetry.events import (
    DeviceMismatch,
    Event,
    Goodbye,
    GroupNorm,
    Heartbeat,
    Hello,
    IsolationViolation,
    Norms,
)

from .fastdecode import WIRE_NORMS, Columns, NormsV1, NormsV2, NormsV3
from .layout import Entry, Published, RunLayout, Waiting
from .sequence import Sequences
from .shards import StepAssembly
from .snapshot import GroupSnapshot, RunSnapshot, Snapshot
from .stats import DaemonStats
from .steps import (
    MAX_PENDING,
    MAX_WAITING,
    GroupHistory,
    ModelSteps,
    RunHistory,
    StepRecord,
    StepRules,
)

__all__ = ["Aggregator", "Limits", "MAX_KINDS", "ESTABLISHED_AFTER_S", "YOUNG_IDLE_S"]

_log = logging.getLogger(__name__)

# Distinct label values kept per group (violation kinds) and per run (mismatch kinds).
MAX_KINDS = 16
# A run with norms is young until its events span this long (two heartbeats of a real
# collector); a young run quiet for YOUNG_IDLE_S gives way when the run table is full.
ESTABLISHED_AFTER_S = 10.0
YOUNG_IDLE_S = 1.0

WireNorms = NormsV3 | NormsV2 | NormsV1
# Unix time minus monotonic time when the daemon started; ``tick`` keeps it current.
_UNIX_OFFSET = time.time() - time.monotonic()
_chain = itertools.chain.from_iterable
_groups_of = operator.attrgetter("groups")
_step_of = operator.attrgetter("step")
_name_of = operator.itemgetter(0)
_sq_of = operator.itemgetter(3)
_sharded_of = operator.itemgetter(5)
_fingerprint_of = operator.itemgetter(7)
# Runs, and records, with steps waiting to be read between two ticks: past this many they
# are read at once, so a flood of run names holds no run the table let go.
_MAX_DIRTY = 1024
_group_norm = GroupNorm._make
_NO_FINGERPRINT = (None,)


def _own(run: _Run) -> bool:
    """A run of one rank by its world size (1), with no fingerprinted step waiting for
    holders: its fingerprinted groups are that rank's, as plain groups are (nothing to
    assemble or compare across ranks)."""
    return run.world_size == 1 and not run.layout.waiting()


def _group_records(groups: tuple[tuple, ...]) -> tuple[GroupNorm, ...]:
    """A wire message's group tuples as records (schema 1 and 2 ones without fingerprint)."""
    if groups and len(groups[0]) == 7:
        return tuple([_group_norm(g + _NO_FINGERPRINT) for g in groups])
    return tuple(map(_group_norm, groups))


@dataclasses.dataclass(frozen=True)
class Limits:
    """The aggregator's caps, and its windows in seconds (from ``Config``: no defaults here)."""

    max_runs: int
    max_groups_per_run: int
    max_ranks_per_run: int
    ttl_s: float
    shard_window_s: float
    ended_retention_s: float  # how long an ended run stays exported; 0: gone at once
    evict_after_s: float  # idle time after which a run with norms may give way to a new one


class _Group:
    __slots__ = (
        "role",
        "params",
        "isolated",
        "captured",
        "sq",
        "step",
        "rank",
        "nonfinite",
        "violations",
        "violation_step",
        "stale",
        "inconsistent",
        "rec",
    )

    def __init__(self) -> None:
        self.role = "group"
        self.params: int | None = None
        self.isolated = False
        self.captured = False
        self.sq: float | None = None
        self.step = -1
        self.rank = -1  # the rank whose capture ``sq`` is (replicated groups)
        self.nonfinite = 0
        self.violations: dict[str, int] = {}
        self.violation_step = -1
        self.stale = False  # the collector reported it can no longer follow the group
        # Why its ranks contradict its latest complete step (layout.py); None: they do not.
        self.inconsistent: str | None = None
        self.rec: StepRecord | None = None  # every step (steps.py), from its first value


class _Run:
    __slots__ = (
        "groups",
        "ranks",
        "world_size",
        "last_seen",
        "captures",
        "last_step",
        "last_rank",
        "last_time",
        "captured_at",
        "dropped",
        "dropped_by_rank",
        "mismatch",
        "shards",
        "ended_at",
        "layout",
        "first_seen",
        "young",
        "model",
        "pend_steps",
        "pend_columns",
        "pend_groups",
    )

    def __init__(self, now: float, limits: Limits, waiting: Waiting) -> None:
        self.groups: dict[str, _Group] = {}
        self.ranks: dict[int, float] = {}  # rank -> clock time last heard
        self.world_size = 0  # the latest announced (Hello, Norms of schema 3); 0: unknown
        self.last_seen = now
        self.captures = 0
        self.last_step = -1
        self.last_rank = -1
        self.last_time = 0.0  # the collector's clock at the run's latest capture (information)
        self.captured_at: float | None = None  # when the latest capture was applied (now)
        self.dropped = 0
        self.dropped_by_rank: dict[int, int] = {}  # latest cumulative count per rank
        self.mismatch: dict[str, int] = {}
        self.shards = StepAssembly(limits.shard_window_s, limits.max_ranks_per_run)
        self.ended_at: float | None = None  # when the last rank said goodbye
        self.first_seen = now
        self.young = False  # has norms, heard from for less than ESTABLISHED_AFTER_S
        # Groups with fingerprints (schema 3): holders, classes, steps (layout.py).
        self.layout = RunLayout(limits.shard_window_s, limits.max_ranks_per_run, waiting)
        self.model = ModelSteps()  # the model norm per complete step, clipped steps
        # Captures applied by the fast path, not yet read into the groups' records: their
        # steps, and a column of values for each of the groups ``pend_groups``.
        self.pend_steps: list[int] = []
        self.pend_columns: list[list[float | None]] = []
        self.pend_groups: list[_Group] = []


class Aggregator:
    """Applies events to run state at the time it is given; builds ``Snapshot``s."""

    def __init__(
        self,
        limits: Limits,
        stats: DaemonStats,
        logger: logging.Logger = _log,
        rules: StepRules | None = None,
    ) -> None:
        self._limits = limits
        self._stats = stats
        self._log = logger
        self._rules = rules or StepRules()
        self._dirty: list[StepRecord] = []  # records with steps not settled yet
        self._dirty_runs: list[_Run] = []  # runs with fast-path steps not read yet
        self._pending_values = 0  # group values waiting in runs and records, at most
        self._waiting = Waiting()  # fingerprinted steps waiting over every run (layout.py)
        self._runs: dict[str, _Run] = {}
        # Admission's candidates, oldest first. Runs that never sent norms, reordered each
        # time one is heard from; ended runs in the order they ended; runs with norms idle
        # for evict_after_s as of the latest scan (runs that cross the line later are all
        # younger, so the order holds; each is checked again when its turn comes).
        self._no_norms: OrderedDict[str, None] = OrderedDict()
        # Young runs in the order they were queued: one heard from since goes to the back
        # when its turn comes (not at every event: that cost a microsecond per message).
        self._young: OrderedDict[str, None] = OrderedDict()
        self._young_scanned = float("nan")
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._idle: deque[tuple[float, str]] = deque()
        self._idle_scanned = float("nan")
        self._now = float("-inf")  # the latest time given to apply or tick
        # Unix time minus ``now``, as the latest tick was told (the import's until then).
        self._unix_offset = _UNIX_OFFSET
        self._handlers: dict[type, Callable[[Event], None]] = {
            Norms: self._norms,  # type: ignore[dict-item]
            Heartbeat: self._heartbeat,  # type: ignore[dict-item]
            Hello: self._hello,  # type: ignore[dict-item]
            IsolationViolation: self._violation,  # type: ignore[dict-item]
            DeviceMismatch: self._mismatch,  # type: ignore[dict-item]
            Goodbye: self._goodbye,  # type: ignore[dict-item]
        }
        # Loss accounting (sequence.py): message numbers per run and rank, for held runs.
        self.sequences = Sequences(self._holds, limits.max_runs, limits.max_ranks_per_run)

    # --- input: events and time ----------------------------------------------------------

    def apply(self, event: Event, now: float) -> None:
        """Apply one event received at ``now``; raises only on a daemon bug (not an event)."""
        self.apply_batch((event,), now)

    def apply_batch(self, events: Sequence[Event], now: float) -> None:
        """Apply one message's events, in order, all received at ``now``.

        ``events`` are records (``esper_telemetry.decode``), the wire structs of one
        collector's healthy ``Norms`` message (``fastdecode.decode_norms``), or one
        collector's captures as ``fastdecode.Columns`` (of one message, or of several the
        receiver put together), applied with the same result without building records. The
        events count as applied even if one of them raises (a daemon bug: the codec
        validated them); the rest of that message is then not applied.
        """
        self._now = now
        self._stats.events += len(events)
        if type(events) is Columns:
            self._columns(events)
            return
        if type(events[0]) in WIRE_NORMS:
            self._wire_norms(events)  # type: ignore[arg-type]
            return
        handlers = self._handlers
        for event in events:
            handlers[type(event)](event)
        self.sequences.observe(events, now)  # loss accounting, after the run was admitted

    def tick(self, now: float, unix_now: float | None = None) -> None:
        """Expire quiet runs and ranks, and give up sharded steps past the window.

        ``unix_now``: the wall clock at ``now``, which dates captures in a snapshot.
        """
        self._now = now
        if unix_now is not None:
            self._unix_offset = unix_now - now
        self._settle()
        ended = self._ended
        kept_until = now - self._limits.ended_retention_s
        while ended:
            name, ended_at = next(iter(ended.items()))
            if ended_at > kept_until:
                break
            del ended[name]
            del self._runs[name]
        cutoff = now - self._limits.ttl_s
        for name, run in list(self._runs.items()):
            if run.ended_at is not None:
                continue
            if run.last_seen < cutoff:
                del self._runs[name]
                self._no_norms.pop(name, None)
                self._young.pop(name, None)
                self._stats.expired_runs += 1
                self._log.info("run expired after %gs without events: %s", self._limits.ttl_s, name)
                continue
            stale = [r for r, t in run.ranks.items() if t < cutoff]
            for r in stale:
                del run.ranks[r]
                self._leave(run, r)
            if len(run.shards):
                run.shards.expire(now)
            if run.layout.groups:
                done, _ = run.layout.tick(run.world_size, now)
                self._published(run, done)

    # --- the run, its ranks, its groups ---------------------------------------------------

    def _holds(self, name: str, rank: int | None) -> bool:
        """Whether the run (and, given one, that rank of it) is held: loss accounting's
        view of what exists."""
        run = self._runs.get(name)
        return run is not None and (rank is None or rank in run.ranks)

    def _refuse(self, reason: str, name: str, rank: int, world: int) -> None:
        self._stats.refused[reason] += 1
        self._log.debug("event refused (%s): run=%s rank=%d world=%d", reason, name, rank, world)

    def _run(self, name: str, rank: int, world: int | None = None) -> _Run | None:
        """The run, created if there is room, with ``rank`` marked as heard; None if refused.

        ``world``: the world size the event itself announces (checked by the caller), which
        ``rank`` is then judged by instead of the run's; the caller sets it on the run.
        """
        run = self._runs.get(name)
        now = self._now
        if run is not None and run.ended_at is not None:
            # Heard from again after it ended: a new run under the same name, from zero.
            del self._runs[name]
            del self._ended[name]
            run = None
        if world is None and run is not None and run.world_size and rank >= run.world_size:
            self._refuse("rank_outside_world", name, rank, run.world_size)
            return None
        if run is None:
            if len(self._runs) >= self._limits.max_runs and not self._make_room():
                self._stats.overflow["runs"] += 1
                return None
            run = self._runs[name] = _Run(now, self._limits, self._waiting)
            self._no_norms[name] = None
            self.sequences.forget(name)  # a run created anew counts its losses from zero
        elif not run.captures:
            self._no_norms.move_to_end(name)
        elif run.young and now - run.first_seen >= ESTABLISHED_AFTER_S:
            self._establish(name, run)
        ranks = run.ranks
        if rank not in ranks:
            if len(ranks) >= self._limits.max_ranks_per_run:
                self._stats.overflow["ranks"] += 1
                return None
        ranks[rank] = now
        run.last_seen = now
        return run

    def _make_room(self) -> bool:
        """Evict the first admission candidate (see the module's docstring); False if none."""
        evicted = self._stats.evicted
        if self._ended:
            name, _ = self._ended.popitem(last=False)
            del self._runs[name]
            evicted["ended"] += 1
            return True
        if self._no_norms:
            name, _ = self._no_norms.popitem(last=False)
            del self._runs[name]
            evicted["no_captures"] += 1
            self._log.debug("run evicted, table full and no norms from it: %s", name)
            return True
        now = self._now
        cutoff = now - self._limits.evict_after_s
        idle = self._idle
        while True:
            while idle:
                last_seen, name = idle.popleft()
                run = self._runs.get(name)
                if run is not None and run.last_seen == last_seen and last_seen <= cutoff:
                    del self._runs[name]
                    self._young.pop(name, None)
                    evicted["idle"] += 1
                    self._log.debug(
                        "run evicted, table full and idle for %gs: %s", now - last_seen, name
                    )
                    return True
            if self._idle_scanned == now:
                break
            # At most one scan per ``now`` (the pump gives a whole turn one ``now``), so a
            # flood that is refused costs one pass over the table per turn, not per event.
            self._idle_scanned = now
            idle.extend(
                sorted(
                    (run.last_seen, name)
                    for name, run in self._runs.items()
                    if run.last_seen <= cutoff
                )
            )
        young = self._young
        if self._young_scanned == now:
            return False  # at most one pass over the young runs per ``now``, as above
        quiet = now - YOUNG_IDLE_S
        for _ in range(len(young)):
            name = next(iter(young))
            run = self._runs.get(name)
            if run is None:  # gone by another way
                del young[name]
                continue
            if run.last_seen <= quiet:
                del young[name]
                del self._runs[name]
                evicted["young"] += 1
                self._log.debug("run evicted, table full and heard from only briefly: %s", name)
                return True
            young.move_to_end(name)  # heard from since it was queued: its turn comes later
        self._young_scanned = now
        return False

    def _establish(self, name: str, run: _Run) -> None:
        """A young run whose events now span ``ESTABLISHED_AFTER_S`` leaves the young ones."""
        run.young = False
        self._young.pop(name, None)

    def _set_world(self, run: _Run, world: int) -> None:
        """A new world size for ``run``: ranks outside it leave, and waiting sharded steps it
        completes are published."""
        run.world_size = world
        for rank in [r for r in run.ranks if r >= world]:
            del run.ranks[rank]
            self._leave(run, rank)
        if len(run.shards):
            for step, totals in run.shards.settle(world):
                self._publish_step(run, step, totals)

    def _world_refused(self, name: str, rank: int, world: int) -> bool:
        """True (counted) if an event announcing ``world`` from ``rank`` must be refused."""
        if world > self._limits.max_ranks_per_run:
            self._refuse("world_too_large", name, rank, world)
            return True
        if rank >= world:
            self._refuse("rank_outside_world", name, rank, world)
            return True
        return False

    def _group(self, run: _Run, name: str) -> _Group | None:
        group = run.groups.get(name)
        if group is None:
            if len(run.groups) >= self._limits.max_groups_per_run:
                self._stats.overflow["groups"] += 1
                return None
            if run.pend_steps:  # read with the groups they were sent beside (a model step)
                self._settle_run(run, self._bucket())
            group = run.groups[name] = _Group()
        return group

    # --- one collector's Norms message, as the fast decoder gives it --------------------

    def _wire_norms(self, events: Sequence[WireNorms]) -> None:
        """Apply a ``decode_norms`` message: the same state as its events one by one.

        Every event is from one run and rank, and its groups have no non-finite gradient
        (``fastdecode`` vouches for that). In the common case (a known run, rank and
        groups, none sharded, every group of the message in its last event, no group going
        back to an older step from another rank) the last event holds every value that
        applying them in order leaves, and the others only count: it is applied once.
        Anything else (a new run, rank or group, a sharded group or a fingerprinted one of
        a run of several ranks, whose steps shards.py and layout.py assemble, a step going
        back, a group missing from the last event) is applied event by event as records,
        exactly as ``decode``'s.
        """
        first = events[0]
        last = events[-1]
        run_name = first.run
        rank = first.rank
        run = self._runs.get(run_name)
        world = last.world  # every event's (fastdecode vouches for one world per message)
        # A rank the run holds is inside its world (a new world size drops the others).
        if run is None or rank not in run.ranks or (world is not None and world != run.world_size):
            return self._wire_norms_as_records(events)
        v3 = type(last) is NormsV3
        # Fingerprinted groups are assembled by step (layout.py) unless the run is one
        # rank's (a world of one with no step waiting there): then, as in _norms, a
        # group's value is that rank's.
        several = v3 and (len(run.ranks) > 1 or not _own(run))
        groups = run.groups
        last_groups = last.groups
        n = len(events)
        width = len(last_groups)
        if n > 1:
            # Every event names the last one's groups in its order (nearly always: a
            # collector sends its groups in one order), or at least no group it lacks.
            entries = list(_chain(map(_groups_of, events)))
            names = list(map(_name_of, entries))
            row = names[-width:]
            uniform = len(entries) == n * width and names == row * n
            if not uniform and len(set(names)) != len(set(row)):
                return self._wire_norms_as_records(events)
        else:
            entries = last_groups
            uniform = True
        if any(map(_sharded_of, entries)):
            # A sharded group's step is the sum over ranks (shards.py, layout.py).
            return self._wire_norms_as_records(events)
        step = last.step
        # Replicas' copies of a step are recorded once (steps.py): what each group held
        # before this message decides which of its steps are new.
        prev: dict[str, tuple[int, int]] | None = {} if len(run.ranks) > 1 else None
        # No group may go back to an older step from another rank: then the last event
        # holds every value that applying them in order leaves. A run of one rank records
        # every event's step, so none may be older than a step another rank (gone since)
        # set. Every group is looked at before any is set: a message that goes as records
        # must find them all as they were.
        low = step if n == 1 or prev is not None else min(map(_step_of, events))
        found = []
        for entry in last_groups:
            group = groups.get(entry[0])
            if (
                group is None
                # A run of one rank records every step: none may be one another rank
                # (gone since) set, nor older (as _norms decides, capture by capture).
                or (
                    (low < group.step or (low == group.step and prev is None))
                    and rank != group.rank
                )
                or (several and entry[7] is not None)
            ):
                return self._wire_norms_as_records(events)
            found.append(group)
        for group, entry in zip(found, last_groups):
            if v3:
                name, role, params, sq, _nonfinite, _sharded, isolated, _fingerprint = entry
            else:
                name, role, params, sq, _nonfinite, _sharded, isolated = entry
            if prev is not None:
                prev[name] = (group.step, group.rank)
            group.role = role
            group.params = params
            group.isolated = isolated
            group.sq = sq
            group.step = step
            group.rank = rank
            group.captured = True
            if group.inconsistent is not None and v3 and entry[7] is not None:
                group.inconsistent = None  # one rank's: nothing to contradict (as _norms)
        # Every step, not only the last one applied: kept as they came, read in bulk.
        if prev is not None:
            self._record_replicas(run, rank, events, prev)
        else:
            self._keep_steps(run, events, entries, found, uniform)
        high = step if n == 1 else max(map(_step_of, events))
        self._captured(run_name, run, rank, n, step, high, last.time)
        self.sequences.observe_message(run_name, rank, first.seq, self._now)

    def _captured(
        self, name: str, run: _Run, rank: int, n: int, step: int, high: int, time_: float
    ) -> None:
        """``n`` captures of ``rank`` applied by a fast path, the last of ``step`` (at the
        collector's ``time_``), the highest of ``high``: the run's bookkeeping as ``_norms``
        leaves it, capture by capture."""
        now = self._now
        run.ranks[rank] = run.last_seen = run.captured_at = now
        if not run.captures:
            self._no_norms.pop(name, None)
            run.young = True
            self._young[name] = None
        run.captures += n
        if run.young and now - run.first_seen >= ESTABLISHED_AFTER_S:
            self._establish(name, run)
        # A capture moves the run's latest if it is at or past it, or of the rank that set
        # it; once one of this rank's has, every later one does: the last one is latest.
        if high >= run.last_step or rank == run.last_rank:
            run.last_step = step
            run.last_rank = rank
            run.last_time = time_

    def _observe(self, c: Columns) -> None:
        """Loss accounting for captures in columns: one message, or one each."""
        first = c.first
        if c.seqs is None:
            self.sequences.observe_message(first.run, first.rank, first.seq, self._now)
        else:
            self.sequences.observe_messages(first.run, first.rank, c.seqs, self._now)

    def _wire_norms_as_records(self, events: Sequence[WireNorms]) -> None:
        norms = self._norms
        for e in events:
            norms(
                Norms(
                    e.run,
                    e.rank,
                    e.time,
                    e.step,
                    e.skipped,
                    _group_records(e.groups),
                    e.world,
                    e.seq,
                )
            )
        first = events[0]
        self.sequences.observe_message(first.run, first.rank, first.seq, self._now)

    def _columns(self, c: Columns) -> None:
        """Apply one collector's captures in columns: the state ``_wire_norms`` leaves.

        Taken whole in the common case of a run of one rank (a known run, rank and
        groups, none sharded, no step older than a group's from another rank gone since);
        anything else goes event by event, message by message (``_columns_as_messages``).
        """
        first = c.first
        run_name = first.run
        rank = first.rank
        run = self._runs.get(run_name)
        world = first.world
        if run is None or rank not in run.ranks or (world is not None and world != run.world_size):
            return self._columns_as_messages(c)
        template = first.groups
        if (
            run.world_size != 1
            and type(first) is NormsV3
            and None not in map(_fingerprint_of, template)
        ):
            # Every group assembled by step across ranks (layout.py): a DDP or FSDP job.
            return self._columns_assembled(c, run)
        if len(run.ranks) > 1:  # replicas' copies of a step are recorded once
            return self._columns_as_messages(c)
        if any(map(_sharded_of, template)):
            return self._columns_as_messages(c)
        v3 = type(first) is NormsV3
        several = v3 and not _own(run)  # fingerprinted groups: as in _wire_norms
        steps = c.steps
        n = len(steps)
        step = steps[-1]
        low = step if n == 1 else min(steps)
        groups = run.groups
        found = []
        for entry in template:
            group = groups.get(entry[0])
            if (
                group is None
                or (low <= group.step and rank != group.rank)  # as in _wire_norms
                or (several and entry[7] is not None)
            ):
                return self._columns_as_messages(c)
            found.append(group)
        for group, entry, column in zip(found, template, c.sqs):
            group.role = entry[1]
            group.params = entry[2]
            group.isolated = entry[6]
            group.sq = column[-1]
            group.step = step
            group.rank = rank
            group.captured = True
            if group.inconsistent is not None and v3 and entry[7] is not None:
                group.inconsistent = None
        self._keep_columns(run, steps, c.sqs, found)
        self._captured(run_name, run, rank, n, step, step if n == 1 else max(steps), c.times[-1])
        self._observe(c)

    def _columns_assembled(self, c: Columns, run: _Run) -> None:
        """Captures in columns of a known rank of ``run`` whose groups are all fingerprinted,
        in a world of other than one: each capture's groups go to layout.py, as ``_norms``
        gives them (which it does for every event: the world cannot change within these),
        without building records."""
        first = c.first
        run_name = first.run
        rank = first.rank
        template = first.groups
        groups = run.groups
        found = [groups.get(entry[0]) for entry in template]
        if None in found:  # a new group: created (or refused) as _norms does
            return self._columns_as_messages(c)
        for group, entry in zip(found, template):
            group.role = entry[1]
            group.isolated = entry[6]
        steps = c.steps
        self._captured(run_name, run, rank, len(c), steps[-1], max(steps), c.times[-1])
        now = self._now
        # Each group's entry but its value: (name, fingerprint, params, replica).
        heads = [(e[0], e[7], e[2], not e[5]) for e in template]
        norms = run.layout.norms
        published = self._published
        world = run.world_size
        make = Entry._make
        for step, row in zip(steps, zip(*c.sqs)):
            entries = [make((n, f, p, q, r)) for (n, f, p, r), q in zip(heads, row)]
            published(run, norms(rank, step, entries, world, now))
        self._observe(c)

    def _columns_as_messages(self, c: Columns) -> None:
        """Captures in columns, applied as records, message by message (what
        ``_wire_norms`` gives for them; the records are built here, not the structs)."""
        first = c.first
        run_name, rank, world, skipped = first.run, first.rank, first.world, first.skipped
        heads = [g[:3] for g in first.groups]
        tails = [g[4:] if len(g) == 8 else g[4:] + _NO_FINGERPRINT for g in first.groups]
        seqs = c.seqs
        norms = self._norms
        observe = self.sequences.observe_message
        rows = zip(*c.sqs) if c.sqs else itertools.repeat((), len(c))
        for i, (step, time_, row) in enumerate(zip(c.steps, c.times, rows)):
            groups = tuple([_group_norm(h + (q,) + t) for h, q, t in zip(heads, row, tails)])
            seq = first.seq if seqs is None else seqs[i]
            norms(Norms(run_name, rank, time_, step, skipped, groups, world, seq))
            if seqs is not None:
                observe(run_name, rank, seq, self._now)
        if seqs is None:
            observe(run_name, rank, first.seq, self._now)

    # --- one handler per event type ------------------------------------------------------

    def _norms(self, ev: Norms) -> None:
        # The hot path: tuple unpacking instead of attribute access, and the common case
        # (a known run and rank) inline rather than through _run().
        run_name, rank, time_, step, _skipped, group_norms, world, _seq = ev
        run = self._runs.get(run_name)
        if run is not None and rank in run.ranks and (world is None or world == run.world_size):
            run.ranks[rank] = run.last_seen = self._now
        else:
            if world is not None and self._world_refused(run_name, rank, world):
                return
            run = self._run(run_name, rank, world)
            if run is None:
                return
            if world is not None and world != run.world_size:
                self._set_world(run, world)
        if not run.captures:
            self._no_norms.pop(run_name, None)
            run.young = True
            self._young[run_name] = None
        run.captures += 1
        run.captured_at = self._now
        if run.young and self._now - run.first_seen >= ESTABLISHED_AFTER_S:
            self._establish(run_name, run)
        if step >= run.last_step or rank == run.last_rank:
            run.last_step = step
            run.last_rank = rank
            run.last_time = time_
        groups = run.groups
        shards = None
        fingerprinted = None
        own = _own(run)
        total, counted = 0.0, 0  # this capture's replicated groups, for the model step
        for name, role, params, sq, nonfinite, sharded, isolated, fingerprint in group_norms:
            group = groups.get(name)
            if group is None:
                group = self._group(run, name)
                if group is None:
                    continue
            group.role = role
            group.isolated = isolated
            if nonfinite:
                group.nonfinite += 1
            if fingerprint is not None:
                if not own:
                    # Schema 3: counted once per class of fingerprints, by step (layout.py).
                    if fingerprinted is None:
                        fingerprinted = []
                    fingerprinted.append(Entry(name, fingerprint, params, sq, not sharded))
                    continue
                group.inconsistent = None  # one rank's: nothing to contradict
            group.params = params
            if sharded:
                if shards is None:
                    shards = []
                shards.append((group, sq))
            elif step >= group.step or rank == group.rank:
                # Ranks' batches interleave: an older step from another rank must not move
                # the norm backwards; the same rank going back is that rank restarting.
                if step > group.step or rank == group.rank:  # replicas' copies count once
                    self._record(run, group, step, sq, model=False)
                    counted += 1
                    if sq is not None:
                        total += sq
                group.sq = sq
                group.step = step
                group.rank = rank
                group.captured = True
        if counted:
            run.model.add(step, total, len(groups), counted)
        if shards is not None:
            self._shard(run, rank, step, shards)
        if fingerprinted is not None:
            steps = run.layout.norms(rank, step, fingerprinted, run.world_size, self._now)
            self._published(run, steps)

    def _shard(
        self, run: _Run, rank: int, step: int, shards: list[tuple[_Group, float | None]]
    ) -> None:
        assembly = run.shards
        waited = assembly.waited
        # 0 while the world size is not known: the step waits for it (shards.py).
        totals, evicted = assembly.add(step, rank, shards, run.world_size, self._now)
        self._stats.world_unknown_steps += assembly.waited - waited
        if evicted:
            self._stats.overflow["pending_steps"] += 1
        if totals is not None:
            self._publish_step(run, step, totals)

    # --- every step (steps.py) -----------------------------------------------------------

    def _record(
        self, run: _Run, group: _Group, step: int, sq: float | None, model: bool = True
    ) -> None:
        """One published step of ``group`` (records path, sharded and fingerprinted steps);
        ``model=False``: the caller adds it to the run's model step with the others of its
        message (``ModelSteps.add`` takes one capture's groups at once)."""
        if run.pend_steps:  # the fast path's steps first: records stay in order
            self._settle_run(run, self._bucket())
        rec = group.rec
        if rec is None:
            rec = group.rec = StepRecord(self._rules)
        fresh = not rec.pending
        rec.push(step, sq)
        if len(rec.pending) >= 2 * MAX_PENDING - 2:  # before push() would settle it itself
            rec.settle(self._bucket())
        elif fresh:
            self._dirty.append(rec)
            if len(self._dirty) > _MAX_DIRTY:
                self._settle()
        self._pending_values += 1
        if self._pending_values > MAX_WAITING:
            self._settle()
        if model:
            run.model.add(step, sq, len(run.groups))

    def _bucket(self) -> int:
        """The window bucket of the latest ``now`` (steps.py)."""
        return int(self._now // self._rules.bucket_s) if self._now > -math.inf else 0

    def _record_replicas(
        self, run: _Run, rank: int, events: Sequence[WireNorms], prev: dict
    ) -> None:
        """A fast-path message of a run of several ranks: each group's steps that no other
        rank's copy recorded already (as ``_norms`` decides for records)."""
        groups = run.groups
        for e in events:
            step = e.step
            total, counted = 0.0, 0
            for entry in e.groups:
                name = entry[0]
                p_step, p_rank = prev[name]
                if step >= p_step or rank == p_rank:
                    if step > p_step or rank == p_rank:
                        sq = entry[3]
                        self._record(run, groups[name], step, sq, model=False)
                        counted += 1
                        if sq is not None:
                            total += sq
                    # A replica's copy of the step is not recorded, but its rank now holds
                    # the group (_norms): that rank's next copy of the step is recorded.
                    prev[name] = (step, rank)
            if counted:
                run.model.add(step, total, len(groups), counted)

    def _settle(self) -> None:
        """Read every pending step into its record (the window, spikes, history)."""
        bucket = self._bucket()
        runs, self._dirty_runs = self._dirty_runs, []
        for run in runs:
            self._settle_run(run, bucket)
        recs, self._dirty = self._dirty, []
        for rec in recs:
            rec.settle(bucket)
        self._pending_values = 0

    def _keep_steps(
        self,
        run: _Run,
        events: Sequence[WireNorms],
        entries: Sequence[tuple],
        found: list[_Group],
        uniform: bool,
    ) -> None:
        """A fast-path message of a run of one rank: its steps and values kept, to be read
        in bulk (``_settle_run``). ``entries``: its events' group tuples in order, those of
        the groups ``found`` (its last event's), in that order, for each event when
        ``uniform``."""
        if not uniform:  # a capture at a time, as _norms records them
            self._settle_run(run, self._bucket())
            for e in events:
                self._record_capture(run, e.step, e.groups)
            return
        width = len(found)
        values = list(map(_sq_of, entries))
        steps = [events[0].step] if len(events) == 1 else list(map(_step_of, events))
        self._keep_columns(run, steps, [values[i::width] for i in range(width)], found)

    def _keep_columns(
        self,
        run: _Run,
        steps: Sequence[int],
        columns: Sequence[Sequence[float | None]],
        found: list[_Group],
    ) -> None:
        """Captures of a run of one rank, kept to be read in bulk (``_settle_run``): their
        ``steps`` and a column of values for each of the groups ``found``."""
        pending = run.pend_steps
        fresh = not pending
        if fresh:
            run.pend_groups = found
            run.pend_columns = [[] for _ in found]
        elif found != run.pend_groups:  # the same objects, or another layout
            self._settle_run(run, self._bucket())
            return self._keep_columns(run, steps, columns, found)
        pending.extend(steps)
        for kept, column in zip(run.pend_columns, columns):
            kept.extend(column)
        self._pending_values += len(steps) * len(found)
        if len(pending) >= MAX_PENDING:
            self._settle_run(run, self._bucket())
        elif fresh:
            self._dirty_runs.append(run)
            if len(self._dirty_runs) > _MAX_DIRTY:  # bounded between ticks, whatever comes
                self._settle()
        if self._pending_values > MAX_WAITING:
            self._settle()

    def _record_capture(self, run: _Run, step: int, entries: Sequence[tuple]) -> None:
        """One capture's groups recorded, and added to its model step together."""
        groups = run.groups
        total, counted = 0.0, 0
        for entry in entries:
            group = groups.get(entry[0])
            if group is None:
                continue
            sq = entry[3]
            self._record(run, group, step, sq, model=False)
            counted += 1
            if sq is not None:
                total += sq
        if counted:
            run.model.add(step, total, len(groups), counted)

    def _settle_run(self, run: _Run, bucket: int | None) -> None:
        """The fast path's captures of ``run``, group by group, in bulk: every capture holds
        the groups of ``pend_groups``, each with its column of values."""
        steps, columns = run.pend_steps, run.pend_columns
        if not steps:
            return
        run.pend_steps, run.pend_columns = [], []
        found = run.pend_groups
        self._pending_values -= len(steps) * len(found)
        groups = run.groups
        rules = self._rules
        at = array("q", steps)
        for group, column in zip(found, columns):
            rec = group.rec
            if rec is None:
                rec = group.rec = StepRecord(rules)
            rec.add_many(steps, column, bucket, True, at)
        if not columns:
            return
        if len(columns) == len(groups):
            # The fast path only takes finite values; a None is a group without gradient.
            try:
                if len(columns) == 1:
                    sums = columns[0]
                    if None in sums:
                        raise TypeError  # as the sums below do on a None
                elif len(columns) <= 4:  # chained adds: the fewest steps through Python
                    total = map(operator.add, columns[0], columns[1])
                    for column in columns[2:]:
                        total = map(operator.add, total, column)
                    sums = list(total)
                else:
                    sums = list(map(sum, zip(*columns)))
            except TypeError:
                sums = [sum(q for q in t if q is not None) for t in zip(*columns)]
            run.model.complete_many(steps, sums, len(groups))
            return
        for step, row in zip(steps, zip(*columns)):
            total = sum(q for q in row if q is not None)
            run.model.add(step, total, len(groups), len(row))

    # --- fingerprinted groups (schema 3): their steps and flags come from layout.py -------

    def _published(self, run: _Run, steps: Sequence[tuple[str, Published]]) -> None:
        """Set the complete steps of fingerprinted groups; log each group's first flag."""
        for name, p in steps:
            group = run.groups.get(name)
            if group is None:
                continue
            if p.inconsistent is None and p.step != group.step:
                self._record(run, group, p.step, p.sq)  # a contradicted value is no step
            group.sq = p.sq
            group.step = p.step
            group.params = p.params
            group.captured = True
            group.inconsistent = p.inconsistent
            layout = run.layout.groups[name]
            if p.inconsistent is not None and not layout.warned:
                layout.warned = True
                self._log.warning(
                    "group inconsistent: run=%s group=%s reason=%s step=%d holders=%d "
                    "fingerprints=%d: %s; its norm and ratio are withheld",
                    next(n for n, r in self._runs.items() if r is run),
                    name,
                    p.inconsistent,
                    p.step,
                    len(layout.holders),
                    len({h.fingerprint for h in layout.holders.values()}),
                    _WHY[p.inconsistent],
                )

    def _leave(self, run: _Run, rank: int) -> None:
        """``rank`` is gone (goodbye, expired, outside the world): it holds no group now."""
        if run.layout.groups:
            self._published(run, run.layout.leave(rank, run.world_size, self._now))

    def _announce(self, run: _Run, ev: Hello) -> None:
        """A Hello's fingerprinted groups: the rank holds exactly these (layout.py)."""
        held = [
            (d.name, d.fingerprint, d.params, d.pieces)
            for d in ev.groups
            if d.fingerprint is not None and d.name in run.groups
        ]
        done = run.layout.announce(ev.rank, held, run.world_size, self._now)
        for held_group in held:
            run.groups[held_group[0]].params = run.layout.groups[held_group[0]].params
        self._published(run, done)

    def _publish_step(self, run: _Run, step: int, totals: dict[_Group, float | None]) -> None:
        for group, sq in totals.items():
            self._record(run, group, step, sq)
            group.sq = sq
            group.step = step
            group.captured = True

    def _hello(self, ev: Hello) -> None:
        if self._world_refused(ev.run, ev.rank, ev.world_size):
            return
        run = self._run(ev.run, ev.rank, ev.world_size)
        if run is None:
            return
        if run.world_size != ev.world_size:
            self._set_world(run, ev.world_size)
        for decl in ev.groups:
            group = self._group(run, decl.name)
            if group is not None:
                group.role = decl.role
                group.params = decl.params
                group.isolated = decl.isolated
                group.stale = False  # a collector attaching anew follows what it declares
        if any(decl.fingerprint is not None for decl in ev.groups):
            self._announce(run, ev)
        if ev.clip is not None:
            if run.pend_steps:  # steps kept before it are judged by the threshold they met
                self._settle_run(run, self._bucket())
            run.model.threshold = ev.clip
        self._log.info(
            "collector hello: run=%s rank=%d world_size=%d host=%s pid=%d "
            "library=%s torch=%s groups=%d",
            ev.run,
            ev.rank,
            ev.world_size,
            ev.hostname,
            ev.pid,
            ev.library_version,
            ev.torch_version,
            len(ev.groups),
        )

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
        if group.rec is None:
            group.rec = StepRecord(self._rules)
        group.rec.mark_violation(ev.step)
        self._log.debug(
            "isolation violation: run=%s group=%s kind=%s step=%d: %s",
            ev.run,
            ev.group,
            ev.kind,
            ev.step,
            ev.evidence,
        )

    def _mismatch(self, ev: DeviceMismatch) -> None:
        run = self._run(ev.run, ev.rank)
        if run is None:
            return
        if not _bump(run.mismatch, ev.kind):
            self._stats.overflow["label_values"] += 1
        # Like a violation's step, a group's staleness is evidence, not a label value: it
        # holds even when the kind cap refused to count the event.
        if ev.kind == "stale" and ev.group:
            group = self._group(run, ev.group)
            if group is not None:
                group.stale = True
        elif ev.kind == "moved":
            group = run.groups.get(ev.group)
            if group is not None:
                group.stale = False

    def _goodbye(self, ev: Goodbye) -> None:
        run = self._runs.get(ev.run)
        if run is None or run.ended_at is not None:
            return
        run.ranks.pop(ev.rank, None)
        self._leave(run, ev.rank)
        if not run.ranks:
            self._stats.ended_runs += 1
            self._log.info("run ended (every rank said goodbye): %s", ev.run)
            self._no_norms.pop(ev.run, None)
            self._young.pop(ev.run, None)
            if self._limits.ended_retention_s > 0:
                run.ended_at = self._now
                self._ended[ev.run] = self._now
            else:
                del self._runs[ev.run]

    # --- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Runs held."""
        return len(self._runs)

    def history(self, name: str) -> RunHistory | None:
        """The run's groups' recent steps (steps.py), settled now; None for a run not held.

        Built on the event-loop thread like a snapshot; the lists are the caller's.
        """
        run = self._runs.get(name)
        if run is None:
            return None
        self._settle()
        bucket = self._bucket()
        groups = []
        for gname, g in run.groups.items():
            rec = g.rec
            groups.append(
                GroupHistory(
                    gname,
                    g.role,
                    g.params,
                    [] if rec is None else rec.points(),
                    [] if rec is None else rec.folded(),
                    [] if rec is None else list(rec.nonfinite_steps),
                    [] if rec is None else list(rec.violation_steps),
                    0 if rec is None else rec.spikes,
                    None if rec is None else rec.extremes(bucket),
                    g.stale,
                    g.inconsistent,
                )
            )
        return RunHistory(name, run.ended_at is not None, run.last_step, tuple(groups))

    def snapshot(self) -> Snapshot:
        """Everything a scrape shows, detached from live state, as of the latest ``now``.

        The queue's figures are not the aggregator's: they are ``None`` here, and the
        daemon fills them in.
        """
        self._settle()
        cutoff = self._now - self._limits.ttl_s
        unix = self._unix_offset
        bucket = self._bucket()
        runs = []
        for name, run in self._runs.items():
            groups = tuple(
                GroupSnapshot(
                    gname,
                    g.role,
                    g.params,
                    g.isolated,
                    g.captured,
                    g.sq,
                    g.step,
                    g.nonfinite,
                    dict(g.violations),
                    g.violation_step,
                    g.stale,
                    g.inconsistent,
                    None if g.rec is None else g.rec.extremes(bucket),
                    0 if g.rec is None else g.rec.spikes,
                )
                for gname, g in run.groups.items()
            )
            collectors = sum(1 for t in run.ranks.values() if t >= cutoff)
            runs.append(
                RunSnapshot(
                    name,
                    run.captures,
                    run.last_step,
                    0.0 if run.captured_at is None else run.captured_at + unix,
                    collectors,
                    run.dropped,
                    run.shards.incomplete + run.layout.incomplete(),
                    dict(run.mismatch),
                    groups,
                    run.ended_at is not None,
                    run.shards.dropped_reports + run.layout.dropped_reports(),
                    collector_time=run.last_time,
                    model_norm=run.model.norm,
                    clip_threshold=run.model.threshold,
                    model_steps=run.model.steps,
                    model_given_up=run.model.given_up,
                    clipped=run.model.clipped,
                )
            )
        s = self._stats
        return Snapshot(
            tuple(runs),
            s.messages,
            s.events,
            dict(s.rejected),
            dict(s.overflow),
            s.expired_runs,
            s.ended_runs,
            evicted=dict(s.evicted),
            messages_lost=self.sequences.lost(),  # loss accounting
            unsequenced_messages=self.sequences.unsequenced,
            implausible_sequence=self.sequences.implausible,
            refused=dict(s.refused),
            world_unknown_steps=s.world_unknown_steps,
        )


_WHY = {
    "values": "ranks holding the same parameters report different values for one step "
    "(parameters left out of the gradient all-reduce?)",
    "contents": "ranks treat the group as replicated but hold different parameters "
    "(parameters that differ per rank inside DDP, or sharded=False over parts)",
    "overlap": "ranks hold some of the group's parameters in common and others apart "
    "(parameters on every rank beside each rank's own, such as a router beside split "
    "experts): give the shared and the split parameters groups of their own",
}


def _bump(counts: dict[str, int], key: str) -> bool:
    """Count one ``key``; False (nothing counted) if it is new and ``counts`` is full."""
    n = counts.get(key)
    if n is None:
        if len(counts) >= MAX_KINDS:
            return False
        n = 0
    counts[key] = n + 1
    return True
