"""Every step of a group (daemon/steps.py): window extremes, spikes, history, model norm.

The record is driven directly with a bucket number for time; its figures are compared with
a direct computation over the same values (a reference that keeps every value).
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from esper_telemetry.daemon.steps import BUCKETS, MAX_PENDING, ModelSteps, StepRecord, StepRules


def reference_spikes(norms: list[float], rules: StepRules) -> list[int]:
    """Indices of the spikes by the rule's definition, keeping every value."""
    out, seen = [], []
    for i, n in enumerate(norms):
        if not math.isfinite(n):
            continue
        history = seen[-rules.spike_history :]
        if len(history) >= rules.spike_min_history and n > rules.spike_factor * statistics.median(
            history
        ):
            out.append(i)
        seen.append(n)
    return out


def feed(rec: StepRecord, norms, bucket: int = 0, start: int = 0, settle_every: int = 1):
    found = 0
    for i, n in enumerate(norms):
        rec.push(start + i, None if n is None else n * n)
        if (i + 1) % settle_every == 0:
            found += rec.settle(bucket)
    return found + rec.settle(bucket)


@pytest.mark.parametrize("settle_every", [1, 7, 64, 10_000])
def test_spikes_match_the_rule_whatever_the_settling(settle_every) -> None:
    rules = StepRules(spike_factor=4.0, spike_history=32, spike_min_history=8)
    rng = random.Random(settle_every)
    # A drifting healthy series (falling fast at first, then noisy), with planted jumps.
    norms = [10.0 * math.exp(-i / 300) * math.exp(rng.gauss(0, 0.25)) + 0.5 for i in range(3000)]
    for i in (5, 40, 41, 900, 2999):
        norms[i] *= 25.0
    norms[1500] = math.inf
    norms[1501] = math.nan
    rec = StepRecord(rules)
    found = feed(rec, norms, settle_every=settle_every)
    want = reference_spikes(norms, rules)
    assert rec.spikes == len(want)
    # What settle() returns adds up to the count, unless push() had to settle by itself.
    assert found == len(want) or settle_every * 2 >= 2 * MAX_PENDING
    # Step 5 comes before min_history values exist; 40 and 41 are both far above the
    # baseline (the median barely moves for one spike); 900 and 2999 too.
    assert want == [40, 41, 900, 2999]


def test_a_single_20x_step_counts_once_and_the_steps_after_it_do_not() -> None:
    rules = StepRules()
    rec = StepRecord(rules)
    rng = random.Random(1)
    norms = [1.0 + rng.uniform(-0.2, 0.2) for _ in range(200)]
    norms[120] = 20.0 * norms[119]
    assert feed(rec, norms, settle_every=3) == 1
    assert feed(rec, [1.0] * 50, start=200) == 0
    assert rec.spikes == 1


def test_window_extremes_hold_every_capture_for_at_least_the_window() -> None:
    rec = StepRecord(StepRules(window_s=60.0))
    step = 0
    # One capture per bucket, norm = bucket number + 1; a spike of 100 in bucket 3.
    for bucket in range(20):
        norm = 100.0 if bucket == 3 else bucket + 1.0
        rec.push(step, norm * norm)
        step += 1
        rec.settle(bucket)
        lo, hi = rec.extremes(bucket)
        window = [100.0 if b == 3 else b + 1.0 for b in range(max(0, bucket - BUCKETS), bucket + 1)]
        assert (lo, hi) == pytest.approx((min(window), max(window)), rel=1e-12)
    # The spike in bucket 3 was readable through bucket 3 + BUCKETS (the full window) ...
    assert rec.extremes(20 + BUCKETS + 1) is None  # ... and nothing is left long after.


def test_extremes_ignore_non_finite_and_missing_gradients() -> None:
    rec = StepRecord(StepRules())
    feed(rec, [2.0, None, math.inf, math.nan, 0.5, 3.0])
    assert rec.extremes(0) == pytest.approx((0.5, 3.0))
    assert rec.nonfinite_steps == [2, 3]


def test_history_keeps_the_last_steps_in_full_and_folds_older_ones_keeping_spikes() -> None:
    rules = StepRules(history_steps=100, fold_steps=10, fold_buckets=5)
    rec = StepRecord(rules)
    norms = [1.0 + (i % 3) for i in range(400)]
    norms[260] = 50.0  # folded away from the full history, kept as a bucket's max
    norms[399] = None
    feed(rec, norms, settle_every=9)
    points = rec.points()
    assert 100 <= len(points) <= 125
    assert points[-1] == (399, None)
    for s, n in points[:-1]:
        assert n == pytest.approx(norms[s], rel=1e-15)
    folds = rec.folded()
    assert len(folds) <= 6 and folds[-1][1] == points[0][0] - 1  # contiguous with the full part
    spike = [f for f in folds if f[0] <= 260 <= f[1]]
    assert spike and spike[0][3] == pytest.approx(50.0)
    for first, last, lo, _ in folds:
        assert last - first < rules.fold_steps
        assert lo == pytest.approx(min(norms[first : last + 1]))


def test_pending_steps_are_bounded_without_a_settle() -> None:
    rec = StepRecord(StepRules())
    for i in range(10 * MAX_PENDING):
        rec.push(i, 1.0)
        assert len(rec.pending) < 2 * MAX_PENDING
    rec.settle(0)
    assert rec.points()[-1] == (10 * MAX_PENDING - 1, 1.0)


def test_model_norm_waits_for_every_group_and_counts_clipped_steps() -> None:
    m = ModelSteps()
    m.threshold = 1.0
    m.add(0, 0.25, groups=2)
    assert m.norm is None  # one group of two
    m.add(0, 0.5, groups=2)
    assert m.norm == pytest.approx(math.sqrt(0.75)) and m.clipped == 0
    m.add(1, 1.0, groups=2)
    m.add(1, None, groups=2)  # no gradient counts as 0
    assert m.norm == pytest.approx(1.0) and m.clipped == 0  # not above the threshold
    m.add(2, 4.0, groups=2)
    m.add(2, 0.0, groups=2)
    assert m.norm == pytest.approx(2.0) and m.clipped == 1
    m.add(2, 9.0, groups=2)  # a late duplicate of a complete step changes nothing
    assert m.norm == pytest.approx(2.0) and m.clipped == 1


def test_model_steps_waiting_are_bounded() -> None:
    m = ModelSteps()
    for s in range(3 * ModelSteps.MAX_OPEN):
        m.add(s, 1.0, groups=2)  # the second group never comes
    assert len(m._open) == ModelSteps.MAX_OPEN and m.given_up == 2 * ModelSteps.MAX_OPEN


@pytest.mark.parametrize(
    "kwargs",
    [{"window_s": 0}, {"spike_factor": 1.0}, {"spike_min_history": 0}, {"history_steps": 0}],
)
def test_rules_refuse_nonsense(kwargs) -> None:
    with pytest.raises(ValueError):
        StepRules(**kwargs)


# --- in the aggregator -------------------------------------------------------------------


def _aggregator():
    import logging

    from daemon_support import make_limits

    from esper_telemetry.daemon.aggregator import Aggregator
    from esper_telemetry.daemon.stats import DaemonStats

    return Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.steps"))


@pytest.mark.parametrize("fast", [False, True])
def test_every_group_of_many_runs_is_read_past_the_pending_bound(fast) -> None:
    # More records than the aggregator keeps waiting between ticks (1,024): each run's
    # steps are read whatever moment the bound is reached.
    from daemon_support import gn, norms

    from esper_telemetry import encode
    from esper_telemetry.daemon.fastdecode import decode_norms

    agg = _aggregator()
    runs, groups = 30, 40
    for step in range(3):
        for r in range(runs):
            ev = norms(
                run=f"r{r}",
                step=step,
                groups=[gn(f"g{g}", float(g + step + 1)) for g in range(groups)],
            )._replace(seq=step)
            wire = decode_norms(encode(ev)) if fast and step else None
            agg.apply_batch(wire if wire is not None else (ev,), now=1000.0 + step)
    snap = agg.snapshot()
    assert len(snap.runs) == runs
    for run in snap.runs:
        assert run.model_steps == 3
        assert run.model_norm == pytest.approx(math.sqrt(sum(g + 3.0 for g in range(groups))))
        for g in run.groups:
            want = float(int(g.name[1:]))
            assert g.window == pytest.approx((math.sqrt(want + 1), math.sqrt(want + 3)))


def test_a_full_record_stays_within_the_bound_docs_multiply_out() -> None:
    # In process, where nothing else is counted: a record whose history, folded buckets,
    # baseline and window are full (steps waiting to be read are bounded over all records:
    # test_steps_waiting_are_bounded_over_every_run_and_record).
    import tracemalloc

    rules = StepRules()
    rng = random.Random(0)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        records = []
        for _ in range(50):
            rec = StepRecord(rules)
            for s in range(0, 4096, 64):
                rec.add_many(list(range(s, s + 64)), [1.0 + rng.random() for _ in range(64)], 0)
            rec.mark_violation(3)
            records.append(rec)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_record = sum(d.size_diff for d in after.compare_to(before, "filename")) / len(records)
    assert len(records[0].folded()) >= rules.fold_buckets  # every bucket full
    assert per_record <= rules.bytes_per_group(), (per_record, rules.bytes_per_group())


def _waiting(agg) -> int:
    """Group values waiting to be read, counted in the lists that hold them."""
    runs = agg._runs.values()
    fast = sum(len(column) for run in runs for column in run.pend_columns)
    records = sum(
        len(g.rec.pending) // 2 for run in runs for g in run.groups.values() if g.rec is not None
    )
    return fast + records


@pytest.mark.parametrize("fast", [False, True])
def test_steps_waiting_are_bounded_over_every_run_and_record(fast) -> None:
    # No tick: 60 runs of 64 groups send 64-step messages (fast path) or one capture at a
    # time (records). What waits is read once it passes the bound over all of them.
    from daemon_support import gn, norms

    from esper_telemetry import encode
    from esper_telemetry.daemon.fastdecode import decode_norms
    from esper_telemetry.daemon.steps import MAX_WAITING

    agg = _aggregator()
    runs, groups, most = 60, 64, 0
    for step in range(0, 192, 64):
        for r in range(runs):
            batch = [
                norms(run=f"r{r}", step=s, groups=[gn(f"g{g}", 1.0 + g) for g in range(groups)])
                for s in range(step, step + 64)
            ]
            if fast and step:
                wire = decode_norms(encode(batch, seq=step))
                assert wire is not None
                agg.apply_batch(wire, now=1000.0)
            else:
                for ev in batch:
                    agg.apply_batch((ev,), now=1000.0)
            waiting = _waiting(agg)
            assert waiting <= MAX_WAITING, (r, step, waiting)
            most = max(most, waiting)
    assert most > MAX_WAITING // 2  # the bound was reached, not merely respected
    agg.tick(1001.0)
    assert _waiting(agg) == 0
    for run in agg.snapshot().runs:
        assert run.model_steps == 192


def test_steps_waiting_at_the_thinnest_spread_hold_what_the_budget_says() -> None:
    # Every run and group at the caps, one capture each waiting (the columns' lists spread
    # thinnest: a value per list), names at their limit: the bytes they hold, read by
    # tracemalloc, are within WAITING_BYTES scaled to the values waiting.
    import tracemalloc

    from daemon_support import gn, norms

    from esper_telemetry import encode
    from esper_telemetry.daemon.fastdecode import decode_norms
    from esper_telemetry.daemon.steps import MAX_WAITING, WAITING_BYTES
    from esper_telemetry.defaults import MAX_STRING_CHARS

    agg = _aggregator()
    runs, groups = 100, 128
    names = [f"g{g}".ljust(MAX_STRING_CHARS, "x") for g in range(groups)]

    def frame(r: int, step: int) -> bytes:
        run = f"r{r}".ljust(MAX_STRING_CHARS, "y")
        groups_ = [gn(name, 1.0 + step / 7 + g) for g, name in enumerate(names)]
        return encode([norms(run=run, step=step, groups=groups_)], seq=step)

    for r in range(runs):  # the runs and groups exist, nothing waits
        agg.apply_batch(decode_norms(frame(r, 10**6)), now=1000.0)
    agg.tick(1000.0)
    assert _waiting(agg) == 0
    encoded = [frame(r, 10**6 + 1) for r in range(runs)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for data in encoded:
            agg.apply_batch(decode_norms(data), now=1000.0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    waiting = _waiting(agg)
    assert waiting == runs * groups <= MAX_WAITING  # all of them waiting, none read yet
    held = sum(d.size_diff for d in after.compare_to(before, "filename"))
    assert 0 < held <= WAITING_BYTES * waiting / MAX_WAITING, (held, waiting)


@pytest.mark.parametrize("seed", range(0, 120, 3))
def test_history_and_folds_equal_a_reference_that_keeps_every_capture(seed) -> None:
    # Whatever the sizes and however captures arrive (one at a time or in batches larger
    # than the rings), the full history is the latest captures from a bucket's edge, and
    # the folded buckets the whole buckets just before it.
    rng = random.Random(seed)
    rules = StepRules(
        history_steps=rng.choice([1, 5, 16, 100, 1024]),
        fold_steps=rng.choice([1, 3, 10, 16]),
        fold_buckets=rng.choice([0, 1, 5, 128]),
    )
    rec = StepRecord(rules)
    every: list[tuple[int, float | None]] = []
    for _ in range(rng.randint(1, 40)):
        k = rng.choice([1, 2, 7, 64, 256, 700])
        values = [rng.choice([None, math.nan, math.inf] + [rng.random()] * 20) for _ in range(k)]
        steps = list(range(len(every), len(every) + k))
        if rng.random() < 0.5:
            rec.add_many(steps, values, 0)
        else:
            for s, q in zip(steps, values):
                rec.push(s, q)
            rec.settle(0)
        every += zip(steps, values)
    points = rec.points()
    shown = len(points)
    assert min(len(every), rules.history_steps) <= shown <= rules.history_steps + rules.fold_steps
    for (step, norm), (want_step, q) in zip(points, every[-shown:]):
        assert step == want_step
        assert repr(norm) == repr(None if q is None else math.sqrt(q))
    folds = rec.folded()
    if not rules.fold_buckets:
        assert folds == []
        return
    width = rules.fold_steps
    older = len(every) - shown
    assert older % width == 0
    assert len(folds) == min(rules.fold_buckets, older // width)
    first_bucket = older // width - len(folds)
    for b, (first, last, lo, hi) in enumerate(folds, start=first_bucket):
        chunk = every[b * width : (b + 1) * width]
        assert (first, last) == (chunk[0][0], chunk[-1][0])
        finite = [math.sqrt(q) for _, q in chunk if q is not None and math.isfinite(q)]
        assert (lo, hi) == ((min(finite), max(finite)) if finite else (None, None))
    if folds:
        assert folds[-1][1] == points[0][0] - 1


def test_model_steps_given_up_are_counted_and_exported() -> None:
    # A group that stops reporting: the run's model steps can no longer complete; each one
    # pushed out of the 64 waiting is counted where a user sees it.
    from daemon_support import gn, norms

    from esper_telemetry.daemon.exporter import RUN_FAMILIES, run_rows

    agg = _aggregator()
    agg.apply_batch((norms(run="r", step=0, groups=[gn("a", 1.0), gn("b", 1.0)]),), now=1.0)
    for step in range(1, 101):
        agg.apply_batch((norms(run="r", step=step, groups=[gn("a", 1.0)]),), now=1.0)
    (run,) = agg.snapshot().runs
    assert run.model_steps == 1 and run.model_given_up == 100 - ModelSteps.MAX_OPEN
    names = [f.name for f in RUN_FAMILIES]
    rows = run_rows(run)[names.index("esper_model_steps_given_up")]
    assert rows == [(("r",), 100 - ModelSteps.MAX_OPEN)]
