"""Every captured step of a group: extremes between scrapes, spikes, and a bounded history.

Prometheus samples the daemon every 15 to 60 s while a job captures several steps a
second, so a gauge of the latest norm misses a spike that lasts one step. The daemon sees
every step; this module keeps, per group, what a sample would miss, in a fixed amount of
memory:

- **Extremes over a trailing window**: the largest and smallest finite norm among the
  captures received in the last ``window_s`` seconds (at most ``window_s`` plus one
  bucket: the window is kept as ``BUCKETS`` buckets of ``window_s / BUCKETS`` seconds and a
  capture stays in the band until its bucket is the oldest one dropped). Every capture
  therefore stays readable for at least ``window_s``: a scrape interval shorter than the
  window never misses it.
- **Spikes**: a capture whose finite norm exceeds ``spike_factor`` times the median of the
  group's previous ``spike_history`` finite norms (once at least ``spike_min_history`` of
  them exist). The median is robust: a spike moves it by one rank, so the steps after a
  spike are judged against the same baseline and a single bad step counts exactly once.
- **History**: the last ``history_steps`` captured steps in full, older ones folded into
  buckets of ``fold_steps`` steps that keep their largest and smallest norm (a spike
  survives folding), at most ``fold_buckets`` of them; and the steps of the latest
  non-finite captures.

The hot path (``push``) appends two numbers to a list; the aggregator's fast path hands
whole columns to ``add_many``. Everything else happens in bulk and mostly in C (``sum``
over a column, ``max``/``min`` mapped over buckets of captures, ``array`` slices), each
value read once, as it arrives: the aggregator settles a record before anything reads it
and at least once per tick (and when it holds ``MAX_PENDING`` steps, or ``MAX_WAITING``
values wait over every record, so what waits is bounded).
Values are sums of squares (``sq``), as they travel: square roots are taken when read.
Single-threaded, like the aggregator that owns the records.
"""

from __future__ import annotations

import math
import operator
from array import array
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "StepRules",
    "StepRecord",
    "ModelSteps",
    "GroupHistory",
    "RunHistory",
    "BUCKETS",
    "MAX_PENDING",
    "MAX_WAITING",
    "WAITING_BYTES",
]

# The trailing window is kept in this many buckets (and one being filled).
BUCKETS = 6
# Steps a record buffers before it settles them itself (2 numbers each).
MAX_PENDING = 256
# Non-finite captures, and isolation violations, whose steps the history keeps.
NONFINITE_MARKS = 64
# Group values waiting to be read, over every run and record of the daemon: past this
# many, the aggregator reads them all at once.
MAX_WAITING = 16_384
# What they hold at most: a float and its list slot, the capture's step, and the lists
# themselves when values are spread thin (one value per group's column): 166 bytes a
# value measured with 12,800 values each in a list of its own (100 runs x 128 groups, one
# capture each: 2.1 MB); 192 a value allowed, 3 MiB in all. No names are held: the
# columns are in the order of the run's groups.
WAITING_BYTES = MAX_WAITING * 192


class GroupHistory(NamedTuple):
    """One group's recent steps, as the history API and the live page read them."""

    name: str
    role: str
    params: int | None
    points: list[tuple[int, float | None]]  # (step, norm) oldest first; None: no gradient
    folded: list[tuple[int, int, float | None, float | None]]  # (first, last, min, max)
    nonfinite_steps: list[int]  # the latest non-finite captures' steps
    violation_steps: list[int]  # the latest isolation violations' steps
    spikes: int
    window: tuple[float, float] | None  # (min, max) finite norm of the trailing window
    stale: bool
    inconsistent: str | None  # why the ranks contradict the group (then no norm is shown)


class RunHistory(NamedTuple):
    """A run's groups' histories (``Aggregator.history``), settled at the time it was read."""

    run: str
    ended: bool
    last_step: int
    groups: tuple[GroupHistory, ...]


_INF = math.inf


@dataclass(frozen=True)
class StepRules:
    """How every step is read; from the daemon's settings (``--window.seconds``, ...)."""

    window_s: float = 60.0
    spike_factor: float = 10.0
    spike_history: int = 32
    spike_min_history: int = 8
    history_steps: int = 1024
    fold_steps: int = 16
    fold_buckets: int = 128

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ValueError(f"window_s must be > 0 seconds, got {self.window_s}")
        if not self.spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1, got {self.spike_factor}")
        if not 1 <= self.spike_min_history <= self.spike_history:
            raise ValueError("spike_min_history must be between 1 and spike_history")
        if self.history_steps < 1 or self.fold_steps < 1 or self.fold_buckets < 0:
            raise ValueError("history sizes must be positive")

    @property
    def bucket_s(self) -> float:
        return self.window_s / BUCKETS

    @property
    def ring_steps(self) -> int:
        """Captures a record's ring holds: the full history from a bucket's edge."""
        return self.history_steps + (self.fold_steps if self.fold_buckets else 0)

    @property
    def ring_buckets(self) -> int:
        """Folded buckets a record's ring holds: those shown, and those the full history
        still holds in full."""
        if not self.fold_buckets:
            return 0
        return self.fold_buckets + self.ring_steps // self.fold_steps + 2

    def bytes_per_group(self) -> int:
        """The most a record holds once full, its steps read (what docs/daemon.md multiplies
        out). Steps waiting to be read are bounded over every record at once, not per
        group: at most ``MAX_WAITING`` values, ``WAITING_BYTES`` in all."""
        history = self.ring_steps * 16  # step and sum of squares, 8 B each
        folds = self.ring_buckets * 32  # first step, last step, min, max
        boxed = 32  # a list slot and the float or int it holds
        baseline = self.spike_history * boxed
        window = 3 * (BUCKETS + 1) * boxed
        marks = 2 * NONFINITE_MARKS * boxed  # non-finite and violation steps
        headers = 1024  # the record, its lists and arrays, the open bucket
        return history + folds + baseline + window + marks + headers


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


class StepRecord:
    """One group's every-step figures (see the module docstring)."""

    __slots__ = (
        "rules",
        "pending",
        "spikes",
        "_baseline",
        "_hi",
        "_lo",
        "_bucket",
        "steps",
        "sqs",
        "folds",
        "_fold",
        "nonfinite_steps",
        "violation_steps",
        "last_step",
        "count",
    )

    def __init__(self, rules: StepRules) -> None:
        self.rules = rules
        self.pending: list = []  # step, sq, step, sq, ... not yet settled
        self.spikes = 0
        self._baseline: list[float] = []  # the previous finite sq values, oldest first
        # Window extremes: one slot per bucket, indexed by bucket number modulo the size.
        self._hi = [-_INF] * (BUCKETS + 1)
        self._lo = [_INF] * (BUCKETS + 1)
        self._bucket = [-1] * (BUCKETS + 1)
        # Rings: the latest captures' steps and values, and the folded buckets (first step,
        # last step, min sq, max sq each), written at the capture's (bucket's) number
        # modulo the size. They start small and then take their full size, then never
        # move: a group that captured a few steps holds a few steps' bytes.
        self.steps = array("q")
        self.sqs = array("d")
        self.folds = array("d")
        self._fold: list[float] | None = None  # the bucket being folded into
        self.nonfinite_steps: list[int] = []
        self.violation_steps: list[int] = []
        self.last_step = -1  # the latest step pushed (replicated groups take each step once)
        self.count = 0  # captures settled, since the record began

    def push(self, step: int, sq: float | None) -> None:
        """Record one captured step (``sq`` None: no gradient). The hot path."""
        pending = self.pending
        pending.append(step)
        pending.append(sq)
        self.last_step = step
        if len(pending) >= 2 * MAX_PENDING:
            self.settle(None)

    def mark_violation(self, step: int) -> None:
        """An isolation violation at ``step`` (kept among the latest ``NONFINITE_MARKS``)."""
        marks = self.violation_steps
        if not marks or marks[-1] != step:
            marks.append(step)
            del marks[:-NONFINITE_MARKS]

    def settle(self, bucket: int | None) -> int:
        """Fold the pending steps into every figure; ``bucket`` is ``int(now / bucket_s)``
        (None: the bucket of the latest settle). Returns the spikes found."""
        pending = self.pending
        if not pending:
            return 0
        self.pending = []
        return self._apply(pending[0::2], pending[1::2], bucket, False)

    def add_many(
        self,
        steps: list[int],
        sqs: list[float | None],
        bucket: int | None,
        vouched: bool = False,
        step_array: array | None = None,
    ) -> int:
        """Record and settle many steps at once (after the pending ones, in order).
        ``vouched``: every value is finite and non-negative, or None (``fastdecode``
        vouches for that), so no pass needs to look for a non-finite one; ``step_array``:
        ``steps`` as an ``array("q")`` (one copy for every group of a capture)."""
        found = self.settle(bucket) if self.pending else 0
        self.last_step = steps[-1]
        return found + self._apply(steps, sqs, bucket, vouched, step_array)

    def _apply(
        self,
        steps: list[int],
        sqs: list[float | None],
        bucket: int | None,
        vouched: bool,
        step_array: array | None = None,
    ) -> int:
        if bucket is None:
            bucket = max(self._bucket)
        try:
            total = sum(sqs)  # raises on a None: a step without gradient
            clean = vouched or total - total == 0.0  # NaN and Inf fail this
        except TypeError:
            clean = False
        folding = self.rules.fold_buckets > 0
        if clean:
            finite = sqs
            kept = sqs
            if folding:  # the buckets' extremes give the batch's: no pass of its own
                lo, hi = self._fold_in(steps, sqs, True)
            else:
                lo, hi = min(sqs), max(sqs)
        else:
            finite = [q for q in sqs if q is not None and q - q == 0.0]
            nonfinite = [s for s, q in zip(steps, sqs) if q is not None and q - q != 0.0]
            if nonfinite:
                marks = self.nonfinite_steps
                marks.extend(nonfinite)
                del marks[:-NONFINITE_MARKS]
            # No gradient is kept as -1.0: sums of squares are never negative.
            kept = [-1.0 if q is None else q for q in sqs]
            if folding:
                self._fold_in(steps, kept, False)
            if finite:
                lo, hi = min(finite), max(finite)
        spikes = 0
        if finite:
            self._extremes(bucket, hi, lo)
            spikes = self._spikes(finite, hi, lo)
        self._history(steps if step_array is None else step_array, kept)
        self.count += len(steps)
        return spikes

    # --- the window -------------------------------------------------------------------

    def _extremes(self, bucket: int, hi: float, lo: float) -> None:
        slot = bucket % (BUCKETS + 1)
        if self._bucket[slot] != bucket:
            self._bucket[slot] = bucket
            self._hi[slot] = hi
            self._lo[slot] = lo
            return
        if hi > self._hi[slot]:
            self._hi[slot] = hi
        if lo < self._lo[slot]:
            self._lo[slot] = lo

    def extremes(self, bucket: int) -> tuple[float, float] | None:
        """(min, max) of the finite norms of the window ending in ``bucket``; None if none."""
        hi, lo = -_INF, _INF
        oldest = bucket - BUCKETS
        for b, h, low in zip(self._bucket, self._hi, self._lo):
            if oldest <= b <= bucket:
                if h > hi:
                    hi = h
                if low < lo:
                    lo = low
        if hi < 0:
            return None
        return math.sqrt(lo), math.sqrt(hi)

    # --- spikes -----------------------------------------------------------------------

    def _spikes(self, finite: list[float], hi: float, lo: float) -> int:
        rules = self.rules
        baseline = self._baseline
        # No value above the factor times the smallest value in play can be a spike
        # (a median is never below the minimum): the common case needs no sorting.
        floor = min(lo, min(baseline)) if baseline else lo
        factor_sq = rules.spike_factor * rules.spike_factor
        if hi <= factor_sq * floor:
            baseline.extend(finite)
            del baseline[: -rules.spike_history]
            return 0
        found = 0
        keep, least = rules.spike_history, rules.spike_min_history
        for q in finite:
            if len(baseline) >= least and q > factor_sq * _median(baseline):
                found += 1
            baseline.append(q)
            if len(baseline) > keep:
                del baseline[0]
        self.spikes += found
        return found

    @property
    def spike_threshold(self) -> float | None:
        """The norm above which the next capture counts as a spike; None until judged."""
        baseline = self._baseline
        if len(baseline) < self.rules.spike_min_history:
            return None
        return self.rules.spike_factor * math.sqrt(_median(baseline))

    # --- history ----------------------------------------------------------------------
    #
    # Every capture goes into the full history and, at once, into the folded buckets of
    # ``fold_steps`` captures (bucket k holds captures k*fold_steps onwards, counted from
    # the record's first). The full history is trimmed at a bucket boundary, so a bucket
    # is either wholly older than the full history (shown folded) or wholly inside it (not
    # shown): nothing is read twice, nothing falls between the two, and a capture is read
    # once, as it arrives, never again when it leaves the full history.

    def _history(self, steps: list[int] | array, kept: list[float]) -> None:
        ring = self.rules.ring_steps
        at = self.count
        if len(kept) > ring:  # only the latest fit
            at += len(kept) - ring
            steps, kept = steps[-ring:], kept[-ring:]
        _put(self.steps, at, steps if type(steps) is array else array("q", steps), ring)
        _put(self.sqs, at, array("d", kept), ring)

    def _fold_in(
        self, steps: list[int], kept: list[float], clean: bool
    ) -> tuple[float, float] | None:
        """Fold captures into buckets of ``fold_steps``: whole buckets in C (``max`` and
        ``min`` mapped over chunks), the ends one bucket at a time. ``clean``: every value
        finite; then returns (min, max) of them all."""
        rules = self.rules
        width = rules.fold_steps
        folds = self.folds
        fold = self._fold
        n = len(steps)
        done = self.count // width  # buckets complete before these captures
        full = 4 * rules.ring_buckets
        lows: list[float] = []
        highs: list[float] = []
        i = 0
        if fold is not None:  # top up the bucket left open by the previous captures
            i = min(width - int(fold[4]), n)
            fold, lo, hi = _folded(steps[:i], kept[:i], fold)
            lows.append(lo)
            highs.append(hi)
            if fold[4] >= width:
                _put(folds, 4 * done, array("d", fold[:4]), full)
                done += 1
                fold = None
        whole = (n - i) // width * width
        if whole:
            if clean:  # one pass each for the mins and maxes
                chunks = list(zip(*[iter(kept[i : i + whole])] * width))
                out = array("d", [0.0]) * (4 * len(chunks))
                out[0::4] = array("d", steps[i : i + whole : width])
                out[1::4] = array("d", steps[i + width - 1 : i + whole : width])
                mins = array("d", map(min, chunks))
                maxes = array("d", map(max, chunks))
                out[2::4] = mins
                out[3::4] = maxes
                skip = max(0, len(out) - full)  # only the latest fit
                _put(folds, 4 * done + skip, out[skip:] if skip else out, full)
                lows.append(min(mins))
                highs.append(max(maxes))
            else:
                for j in range(max(i, i + whole - width * rules.ring_buckets), i + whole, width):
                    bucket = _folded(steps[j : j + width], kept[j : j + width], None)[0][:4]
                    _put(folds, 4 * (done + (j - i) // width), array("d", bucket), full)
            i += whole
        if i < n:
            fold, lo, hi = _folded(steps[i:], kept[i:], None)
            lows.append(lo)
            highs.append(hi)
        self._fold = fold
        return (min(lows), max(highs)) if clean else None

    def _shown(self) -> int:
        """The number of the oldest capture shown in full: the last ``history_steps`` at
        least, from a bucket's edge (so the folded buckets before it are whole)."""
        rules = self.rules
        first = max(0, self.count - rules.history_steps)
        if rules.fold_buckets:
            first = first // rules.fold_steps * rules.fold_steps
        return first

    def points(self) -> list[tuple[int, float | None]]:
        """(step, norm) for the steps kept in full, oldest first; None: no gradient, and a
        non-finite norm as it was (``inf`` or ``nan``)."""
        first = self._shown()
        steps = _get(self.steps, first, self.count)
        sqs = _get(self.sqs, first, self.count)
        return [(s, None if q < 0 else math.sqrt(q)) for s, q in zip(steps, sqs)]

    def folded(self) -> list[tuple[int, int, float | None, float | None]]:
        """(first step, last step, min norm, max norm) of the folded buckets older than the
        full history, oldest first, at most ``fold_buckets`` (None where a bucket held no
        finite norm)."""
        rules = self.rules
        if not rules.fold_buckets:
            return []
        older = self._shown() // rules.fold_steps  # whole buckets before the full history
        f = _get(self.folds, 4 * max(0, older - rules.fold_buckets), 4 * older)
        out = []
        for i in range(0, len(f), 4):
            lo, hi = f[i + 2], f[i + 3]
            finite = hi >= 0
            out.append(
                (
                    int(f[i]),
                    int(f[i + 1]),
                    math.sqrt(lo) if finite else None,
                    math.sqrt(hi) if finite else None,
                )
            )
        return out


def _put(ring: array, at: int, values: array, full: int) -> None:
    """Write ``values`` (at most ``full``) into ``ring`` from position ``at`` (counted
    from the first write, taken modulo the ring's size), growing the ring first where
    they would not fit (it only wraps once at ``full``)."""
    size = len(ring)
    end = at + len(values)
    if end > size and size < full:
        # 64 first (pymalloc's small blocks, reused once freed), then the full size: a
        # ring moves at most twice, and leaves no run of freed blocks between sizes.
        grown = full if size else min(full, max(end, 64))
        ring.frombytes(bytes(ring.itemsize * (grown - size)))
        size = grown
    pos = at % size
    n = len(values)
    head = min(n, size - pos)
    if head == n:
        ring[pos : pos + n] = values
    else:
        ring[pos:] = values[:head]
        ring[: n - head] = values[head:]


def _get(ring: array, start: int, stop: int) -> array:
    """Positions ``start`` to ``stop`` (as ``_put`` counts them) of ``ring``, in order."""
    n = stop - start
    if n <= 0:
        return ring[:0]
    size = len(ring)
    pos = start % size
    if pos + n <= size:
        return ring[pos : pos + n]
    return ring[pos:] + ring[: pos + n - size]


def _folded(
    steps: list[int], sqs: list[float], fold: list | None
) -> tuple[list, float | None, float | None]:
    """``fold`` ([first step, last step, min sq, max sq, captures]) with more captures
    (``sqs`` as the history keeps them: -1.0 for no gradient), and the smallest and
    largest finite of them (None if none)."""
    if fold is None:
        fold = [float(steps[0]), 0.0, _INF, -_INF, 0]
    fold[1] = float(steps[-1])
    fold[4] += len(steps)
    try:
        total = sum(sqs)
        clean = total - total == 0.0 and min(sqs) >= 0.0
    except ValueError:
        clean = False
    finite = sqs if clean else [q for q in sqs if q >= 0.0 and q - q == 0.0]
    if not finite:
        return fold, None, None
    lo, hi = min(finite), max(finite)
    if lo < fold[2]:
        fold[2] = lo
    if hi > fold[3]:
        fold[3] = hi
    return fold, lo, hi


class ModelSteps:
    """A run's model norm per step (the square root of the sum over its groups) and how many
    steps exceeded the clip threshold.

    A step is complete once every group the run holds has a value for it (a group without
    gradient counts as 0); groups are watched apart and never share a parameter (``attach``
    refuses that), so the sum is the norm of the union of the groups, which is the model's
    when the groups cover the model. At most ``MAX_OPEN`` steps wait for their last group;
    an older one is dropped (counted) when a newer one must open.
    """

    MAX_OPEN = 64

    __slots__ = ("_open", "done_step", "norm", "clipped", "given_up", "threshold", "steps")

    def __init__(self) -> None:
        self._open: dict[int, list] = {}  # step -> [sum of squares, groups counted]
        self.done_step = -1
        self.norm: float | None = None  # the latest complete step's model norm
        self.clipped = 0
        self.given_up = 0
        self.threshold: float | None = None  # the clip threshold (Hello), None: unknown
        self.steps = 0  # complete steps

    def add(self, step: int, sq: float | None, groups: int, count: int = 1) -> None:
        """``count`` groups' values (summed in ``sq``) for ``step``, of a run holding
        ``groups`` groups."""
        if step <= self.done_step:
            return
        acc = self._open.get(step)
        if acc is None:
            if len(self._open) >= self.MAX_OPEN:
                del self._open[min(self._open)]
                self.given_up += 1
            acc = self._open[step] = [0.0, 0]
        if sq is not None:
            acc[0] += sq
        acc[1] += count
        if acc[1] >= groups:
            self._complete(step, acc[0])

    def complete_many(self, steps: list[int], sqs: list[float], groups: int) -> None:
        """Captures of every one of the run's ``groups`` groups, in order: what ``add`` of
        each would leave, in bulk when nothing waits and the steps only go up."""
        done = self.done_step
        if not self._open and max(steps) <= done:
            return  # every one counted already (a collector restarted under the run's name)
        if self._open or steps[0] <= done or any(map(operator.ge, steps, steps[1:])):
            for s, q in zip(steps, sqs):
                self.add(s, q, groups, groups)
            return
        self.done_step = steps[-1]
        last = sqs[-1]
        self.norm = math.sqrt(last) if last >= 0 else math.nan
        self.steps += len(steps)
        t = self.threshold
        if t is not None:
            self.clipped += len(list(filter((t * t).__lt__, sqs)))

    def _complete(self, step: int, sq: float) -> None:
        for s in [s for s in self._open if s <= step]:
            del self._open[s]
        self.done_step = step
        self.norm = math.sqrt(sq) if sq >= 0 else math.nan
        self.steps += 1
        t = self.threshold
        if t is not None and sq > t * t:  # as complete_many judges
            self.clipped += 1

    def restart(self) -> None:
        """The run's steps started again (a collector restarted from step 0)."""
        self._open.clear()
        self.done_step = -1
