"""Groups described by fingerprints: each element counted once, and no number ranks contradict.

Layouts no DTensor describes (README, "Distributed"). From schema 3 on every group entry
carries a fingerprint of what its rank counts of the group (the collector's
``fingerprint.py``: each parameter's name and shape, a DTensor's placements and which
shard the rank holds), and ``params`` counts those elements. Here, per run and group:

- The ranks that hold a group are its holders (a rank's ``Hello`` declares its groups, each
  capture lists them again, so a daemon restarted mid-run needs no ``Hello``). Holders with
  one fingerprint form a class: replicas of the same elements (DDP, the data-parallel copies
  of a pipeline stage, the router beside split experts). Different classes hold different
  elements (pipeline stages, each rank's experts, tensor-parallel shards after the
  collector's placement mask). A step's value is the sum over its classes of one rank's
  value each, and so is the group's parameter count: pipeline x data parallel (four ranks,
  two fingerprints) sums two values.
- A step is published once every holder reported it, and not before every rank of the
  world is known (announced its groups): until then a rank not heard from could hold a
  part. A run whose world never fills (collectors attached on some ranks only) counts over
  the ranks heard once ``window_s`` has passed since its first capture. A step no holder
  reported to for ``window_s`` is given up (``incomplete``); a report for a step
  already published or given up, or a rank's repeat, is dropped (``dropped_reports``).
- The safety net (``Published.inconsistent``): the step is not a number, and the group is
  flagged, when
  * ``"values"``: two replicas (one fingerprint) report values that differ by more than
    ``REPLICA_RTOL`` (weights left out of DDP: same names and shapes, other values);
  * ``"contents"``: ranks that claim the group is replicated (``sharded`` false) announce
    different fingerprints, or every class reports the same non-zero value: gradients
    reduced together over parameters that are not the same on every rank (DDP around an
    adapter per rank) are neither replicas nor parts;
  * ``"overlap"``: two fingerprints share a parameter, as the samples of parameter hashes
    the ranks' ``Hello``s carry show (the router on every rank beside each rank's experts,
    all in one group): adding them would count the shared parameters once per fingerprint.
    Without those samples (a daemon restarted after the ``Hello``s) this is not checked.
  The flag is the latest complete step's: a later consistent step clears it.

Bounded like ``shards.StepAssembly``: a pending step holds a running sum, a bit per rank and
per class, and the first value of each class of several ranks only (a 4,096-rank FSDP job's
classes hold one rank each and store nothing); at most ``MAX_PENDING_STEPS`` wait per group,
and ``MAX_WAITING_STEPS`` over every group of every run (``Waiting``, shared by the
aggregator's runs; a run's layout gives its share back when it is freed).
Pure: no clock (``now`` is passed in) and no knowledge of the aggregator.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

__all__ = [
    "RunLayout",
    "GroupLayout",
    "Published",
    "Entry",
    "REPLICA_RTOL",
    "MAX_PENDING_STEPS",
    "MAX_WAITING_STEPS",
    "Waiting",
    "CLOSED_MEMORY",
    "INCONSISTENT_REASONS",
]

# Two replicas' sums of squares for one step agree within this relative difference. All-
# reduced gradients are bitwise equal on every rank, and ranks running the same code compute
# bitwise equal sums in practice; what is allowed for is another summation order (another
# thread count, another CPU's MKL): the collector's norm is within 1e-5 of the float64 norm
# for float32 gradients (README, "Norms"), so a sum of squares within 2e-5, and two such sums
# of one gradient within 4e-5 of the larger.
REPLICA_RTOL = 4e-5
# Per group: a collector sends up to 256 steps in one message (its publisher's largest
# batch), and a rank's message read first opens every one of them.
MAX_PENDING_STEPS = 256
# Over every group of every run (``Waiting``): a waiting step of a 4,096-rank job holds
# about 1.35 KB (its rank and class bits), so at most about 88 MB; a 4,096-rank job of 128
# groups flushing 256 steps a rank needs half of it.
MAX_WAITING_STEPS = 65_536
CLOSED_MEMORY = 1024
INCONSISTENT_REASONS = ("values", "contents", "overlap")


class Entry(NamedTuple):
    """One group of one rank's capture, as the layout needs it."""

    name: str
    fingerprint: int
    params: int
    sq: float | None
    replica: bool  # the rank claims its value is the group's (``sharded`` false)


class Published(NamedTuple):
    """A complete step of one group: its value, its parameter count, and whether the ranks
    contradict it (then it is no number: ``inconsistent`` is the reason)."""

    step: int
    sq: float | None
    params: int
    inconsistent: str | None


class _Holder(NamedTuple):
    fingerprint: int
    params: int


class _Step:
    __slots__ = (
        "since",
        "ranks",
        "classes",
        "count",
        "sq",
        "params",
        "firsts",
        "mismatch",
        "unverified",
        "replica",
        "ref",
        "equal",
        "compared",
        "overlap",
    )

    def __init__(self, since: float) -> None:
        self.since = since
        self.ranks = 0  # bit per rank index: reported
        self.classes = 0  # bit per class index: its first report added
        self.count = 0  # classes added
        self.sq: float | None = None
        self.params = 0
        self.firsts: dict[int, float | None] = {}  # class index -> its first value
        self.mismatch = False  # two replicas disagreed
        self.unverified = False  # a replica came whose class's first value was not kept
        self.replica = False  # a rank claimed the group replicated
        self.ref: float | None = None  # the first class's non-zero value
        self.equal = True  # every class's non-zero value so far equals ref
        self.compared = 0  # classes whose non-zero value was compared with ref
        # A class that reported it overlapped another's parameters, and has left since
        # (its sample of parameter hashes went with it).
        self.overlap = False


def _agree(a: float | None, b: float | None) -> bool:
    """Two replicas' values of one step agree: both no gradient, both NaN, equal infinities,
    or finite within ``REPLICA_RTOL`` of the larger."""
    if a is None or b is None:
        return a is b
    if a == b:
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= REPLICA_RTOL * max(a, b)


class Waiting:
    """Fingerprinted steps waiting, over every group of every run: at most ``cap``."""

    __slots__ = ("count", "cap")

    def __init__(self, cap: int = MAX_WAITING_STEPS) -> None:
        self.count = 0
        self.cap = cap

    def release(self, held: list[int]) -> None:
        """A run's layout is gone: what its groups held waiting is free again."""
        self.count -= held[0]
        held[0] = 0


class GroupLayout:
    """One group's holders and pending steps; single-threaded."""

    __slots__ = (
        "_waiting",
        "_held",
        "holders",
        "_sizes",
        "_class_params",
        "_samples",
        "_overlap",
        "params",
        "_mask",
        "_rank_index",
        "_class_index",
        "_pending",
        "_closed",
        "incomplete",
        "dropped_reports",
        "inconsistent",
        "warned",
    )

    def __init__(self, waiting: Waiting | None = None, held: list[int] | None = None) -> None:
        # The budget over every run, and this run's share of it (RunLayout).
        self._waiting = Waiting() if waiting is None else waiting
        self._held = [0] if held is None else held
        self.holders: dict[int, _Holder] = {}
        self._sizes: dict[int, int] = {}  # holders per fingerprint
        self._class_params: dict[int, int] = {}  # elements per fingerprint (its first holder's)
        # Per fingerprint, the sample of its plain parameters' hashes a Hello declared.
        self._samples: dict[int, frozenset[int]] = {}
        self._overlap: bool | None = False  # two fingerprints' samples share a hash; None: unknown
        self.params = 0  # the group's parameter count: one per class, added
        self._mask = 0  # bits of the holders' rank indices
        self._rank_index: dict[int, int] = {}
        self._class_index: dict[int, int] = {}
        self._pending: dict[int, _Step] = {}  # insertion order = age
        self._closed: OrderedDict[int, None] = OrderedDict()
        self.incomplete = 0
        self.dropped_reports = 0
        self.inconsistent: str | None = None  # the latest complete step's flag
        self.warned = False  # the daemon logged this group's first flag

    def __len__(self) -> int:
        """Steps waiting for holders."""
        return len(self._pending)

    # --- holders ---------------------------------------------------------------------

    def hold(self, rank: int, fingerprint: int, params: int) -> None:
        """``rank`` holds the group as ``fingerprint`` with ``params`` counted elements."""
        old = self.holders.get(rank)
        if old is not None and old[0] == fingerprint and old[1] == params:
            return  # the common case, every capture: nothing changed
        self.holders[rank] = _Holder(fingerprint, params)
        if old is None:
            self._mask |= 1 << self._index(rank)
        else:
            self._drop(old.fingerprint)
        n = self._sizes.get(fingerprint, 0)
        if n == 0:
            self._class_params[fingerprint] = params
            self.params += params
            if fingerprint in self._samples:
                self._overlap = None
        self._sizes[fingerprint] = n + 1

    def sample(self, fingerprint: int, pieces: Sequence[int]) -> None:
        """The hashes of (the smallest of) the plain parameters ``fingerprint`` counts."""
        if pieces and self._samples.get(fingerprint) != (sample := frozenset(pieces)):
            self._samples[fingerprint] = sample
            self._overlap = None

    def overlap(self) -> bool:
        """Whether two fingerprints held now share a parameter, by their samples."""
        if self._overlap is None:
            owner: dict[int, int] = {}
            self._overlap = False
            for fingerprint in self._sizes:
                for piece in self._samples.get(fingerprint, ()):
                    if owner.setdefault(piece, fingerprint) != fingerprint:
                        self._overlap = True
                        return True
        return self._overlap

    def leave(self, rank: int) -> bool:
        """``rank`` holds none of the group (any more); True if it did.

        A pending step it did not report, and no replica of its reported for it, lacks
        its part for good: given up, never published short.
        """
        old = self.holders.pop(rank, None)
        if old is None:
            return False
        # Judged while its sample is still here: a step it reported that completes after it
        # left (a goodbye before the step's last report) is as overlapping as it was.
        shared = self.overlap()
        self._drop(old.fingerprint)
        bit = 1 << self._rank_index[rank]
        self._mask &= ~bit
        index = self._class_index.get(old.fingerprint)
        cbit = 0 if index is None else 1 << index
        for step in [
            s for s, p in self._pending.items() if not (p.ranks & bit or p.classes & cbit)
        ]:
            self._give_up(step)
        if shared:
            for p in self._pending.values():
                if p.ranks & bit:
                    p.overlap = True
        return True

    def _drop(self, fingerprint: int) -> None:
        n = self._sizes[fingerprint] - 1
        if n:
            self._sizes[fingerprint] = n
        else:
            del self._sizes[fingerprint]
            self.params -= self._class_params.pop(fingerprint)
            if self._samples.pop(fingerprint, None) is not None:
                self._overlap = None

    def _index(self, rank: int) -> int:
        index = self._rank_index.get(rank)
        if index is None:
            index = self._rank_index[rank] = len(self._rank_index)
        return index

    def _compact(self) -> None:
        """Forget indices of ranks and classes gone; only while no step is pending."""
        if len(self._rank_index) > 2 * len(self.holders) + 8:
            self._rank_index = {r: i for i, r in enumerate(self.holders)}
            self._mask = (1 << len(self.holders)) - 1
        if len(self._class_index) > 2 * len(self._sizes) + 8:
            self._class_index = {}

    # --- steps -------------------------------------------------------------------------

    def report(
        self, rank: int, step: int, entry: Entry, now: float, settled: bool
    ) -> Published | None:
        """Take ``rank``'s value of ``step``; the step if it is now complete."""
        self.hold(rank, entry.fingerprint, entry.params)
        pending = self._pending.get(step)
        if pending is None:
            if step in self._closed:
                self.dropped_reports += 1  # a straggler or a repeat for a closed step
                return None
            waiting = self._waiting
            if len(self._pending) >= MAX_PENDING_STEPS or waiting.count >= waiting.cap:
                if not self._pending:
                    # Every waiting step is another group's: this one cannot wait (counted).
                    self._give_up(step)
                    return None
                self._give_up(next(iter(self._pending)))
            elif not self._pending:
                self._compact()
            pending = self._pending[step] = _Step(now)
            waiting.count += 1
            self._held[0] += 1
        bit = 1 << self._rank_index[rank]
        if pending.ranks & bit:
            self.dropped_reports += 1
            return None
        pending.ranks |= bit
        pending.since = now  # the window runs from the latest report
        if entry.replica:
            pending.replica = True
        fingerprint, sq = entry.fingerprint, entry.sq
        index = self._class_index.get(fingerprint)
        if index is None:
            index = self._class_index[fingerprint] = len(self._class_index)
        cbit = 1 << index
        if pending.classes & cbit:
            # A replica of a class already added: it must agree with the class's first.
            if index in pending.firsts:
                if not _agree(pending.firsts[index], sq):
                    pending.mismatch = True
            else:
                # The class grew after its first report (a rank joined it): nothing to
                # check this replica against, so the step cannot be vouched for.
                pending.unverified = True
        else:
            pending.classes |= cbit
            pending.count += 1
            pending.params += entry.params
            if sq is not None:
                pending.sq = sq if pending.sq is None else pending.sq + sq
                if sq != 0.0 and math.isfinite(sq):  # an all-reduce's mark: a finite value
                    if pending.ref is None:
                        pending.ref = sq
                    else:
                        pending.compared += 1
                        if pending.equal and not _agree(pending.ref, sq):
                            pending.equal = False
            if not settled or self._sizes.get(fingerprint, 0) > 1:
                # Kept for the replicas to check against; a class of one rank keeps none,
                # unless the world is not known yet (its replicas may still announce).
                pending.firsts[index] = sq
        if settled and pending.ranks & self._mask == self._mask:
            return self._publish(step, pending)
        return None

    def complete(self, settled: bool) -> list[Published]:
        """Steps that the holders now make complete (after a holder left, or the world
        became known), in the order they opened."""
        if not settled or not self._pending:
            return []
        mask = self._mask
        done = [s for s, p in self._pending.items() if p.ranks & mask == mask]
        published = [self._publish(s, self._pending[s]) for s in done]
        return [p for p in published if p is not None]

    def expire(self, now: float, window_s: float) -> int:
        """Give up the steps no holder reported to for ``window_s``; how many."""
        cutoff = now - window_s
        late = [s for s, p in self._pending.items() if p.since < cutoff]
        for step in late:
            self._give_up(step)
        return len(late)

    def restart(self) -> None:
        """A collector attached anew: steps already closed may come again."""
        self._closed.clear()

    def _publish(self, step: int, pending: _Step) -> Published | None:
        if pending.unverified:
            self._give_up(step)
            return None
        self._close(step)
        flag = None
        if pending.mismatch:
            flag = "values"
        elif pending.count > 1 and (pending.replica or (pending.equal and pending.compared)):
            flag = "contents"
        elif pending.count > 1 and (pending.overlap or self.overlap()):
            flag = "overlap"
        self.inconsistent = flag
        return Published(step, pending.sq, pending.params, flag)

    def _give_up(self, step: int) -> None:
        self._close(step)
        self.incomplete += 1

    def _close(self, step: int) -> None:
        if self._pending.pop(step, None) is not None:
            self._waiting.count -= 1
            self._held[0] -= 1
        closed = self._closed
        closed[step] = None
        if len(closed) > CLOSED_MEMORY:
            closed.popitem(last=False)


class RunLayout:
    """The fingerprinted groups of one run, and which ranks have announced theirs."""

    __slots__ = (
        "groups",
        "_known",
        "_announced",
        "_since",
        "_window_s",
        "_max_ranks",
        "_waiting",
        "_held",
        "__weakref__",
    )

    def __init__(self, window_s: float, max_ranks: int, waiting: Waiting | None = None) -> None:
        # Steps waiting over every run (the aggregator's one ``Waiting``); what this run's
        # groups hold of it goes back when the layout is freed with its run.
        self._waiting = Waiting() if waiting is None else waiting
        self._held = [0]
        weakref.finalize(self, self._waiting.release, self._held)
        self.groups: dict[str, GroupLayout] = {}
        self._known: set[int] = set()  # ranks that announced their groups
        self._announced: dict[int, tuple[str, ...]] = {}  # rank -> its groups, as last listed
        self._since: float | None = None  # the first capture's time
        self._window_s = window_s
        self._max_ranks = max_ranks

    def waiting(self) -> bool:
        """Whether any step of the run's groups waits for its holders."""
        return self._held[0] > 0

    def settled(self, world: int, now: float) -> bool:
        """Every rank of the world announced its groups, or the window passed since the
        first capture (collectors on some ranks only: the ranks heard are all there is)."""
        if world and len(self._known) >= world:
            return True
        return self._since is not None and now - self._since >= self._window_s

    def group(self, name: str) -> GroupLayout:
        layout = self.groups.get(name)
        if layout is None:
            layout = self.groups[name] = GroupLayout(self._waiting, self._held)
        return layout

    def announce(
        self,
        rank: int,
        held: Iterable[tuple[str, int, int, Sequence[int]]],
        world: int,
        now: float,
    ) -> list[tuple[str, Published]]:
        """``rank`` holds exactly these groups (name, fingerprint, params, sample of its plain
        parameters' hashes), from its ``Hello``; what that completes."""
        held = tuple(held)
        for name, fingerprint, params, pieces in held:
            layout = self.group(name)
            layout.sample(fingerprint, pieces)
            layout.hold(rank, fingerprint, params)
            layout.restart()
        return self._listed(rank, tuple(h[0] for h in held), world, now)

    def norms(
        self, rank: int, step: int, entries: Sequence[Entry], world: int, now: float
    ) -> list[tuple[str, Published]]:
        """One capture of ``rank``: its fingerprinted groups, all of them (the ones it no
        longer lists leave). The steps complete now."""
        if self._since is None:
            self._since = now
        out = self._listed(rank, tuple(e.name for e in entries), world, now)
        settled = self.settled(world, now)
        for entry in entries:
            published = self.group(entry.name).report(rank, step, entry, now, settled)
            if published is not None:
                out.append((entry.name, published))
        return out

    def leave(self, rank: int, world: int, now: float) -> list[tuple[str, Published]]:
        """``rank`` is gone (goodbye, expired, outside the world): what that completes."""
        self._announced.pop(rank, None)
        out: list[tuple[str, Published]] = []
        settled = self.settled(world, now)
        for name, layout in self.groups.items():
            if layout.leave(rank):
                out.extend((name, p) for p in layout.complete(settled))
        return out

    def tick(self, world: int, now: float) -> tuple[list[tuple[str, Published]], int]:
        """Steps the window gives up (how many), and those that settling completes."""
        out: list[tuple[str, Published]] = []
        given_up = 0
        settled = self.settled(world, now)
        for name, layout in self.groups.items():
            if len(layout):
                out.extend((name, p) for p in layout.complete(settled))
                given_up += layout.expire(now, self._window_s)
        return out, given_up

    def incomplete(self) -> int:
        return sum(g.incomplete for g in self.groups.values())

    def dropped_reports(self) -> int:
        return sum(g.dropped_reports for g in self.groups.values())

    def _listed(
        self, rank: int, names: tuple[str, ...], world: int, now: float
    ) -> list[tuple[str, Published]]:
        if len(self._known) < 2 * self._max_ranks:
            self._known.add(rank)
        before = self._announced.get(rank)
        if before == names:
            return []
        self._announced[rank] = names
        out: list[tuple[str, Published]] = []
        if before:
            listed = set(names)
            settled = self.settled(world, now)
            for name in before:
                layout = self.groups.get(name)
                if name not in listed and layout is not None and layout.leave(rank):
                    out.extend((name, p) for p in layout.complete(settled))
        return out
