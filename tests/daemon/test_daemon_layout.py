"""Fingerprinted groups (schema 3): one value per fingerprint, added, and flags where the
ranks contradict a step. ``layout.py`` on its own, then through the aggregator to the
exposition. The end-to-end cases (real rank processes, real daemon) are
``tests/collector/test_layouts_gloo.py``."""

from __future__ import annotations

import logging
import math

import pytest
from daemon_support import exposition, get, parse

from esper_telemetry import GroupDecl, GroupNorm, Hello, Norms
from esper_telemetry.daemon.layout import REPLICA_RTOL, Entry, GroupLayout, RunLayout
from esper_telemetry.ratio import seed_ratio

WINDOW = 30.0


def entry(name: str, fp: int, sq: float | None, params: int = 10, replica: bool = False) -> Entry:
    return Entry(name, fp, params, sq, replica)


def run_layout() -> RunLayout:
    return RunLayout(WINDOW, 4096)


def published(out, name):
    got = [p for n, p in out if n == name]
    assert len(got) <= 1, got
    return got[0] if got else None


# --- the rule -----------------------------------------------------------------------


def test_pipeline_times_data_parallel_sums_one_replica_per_fingerprint():
    lay = run_layout()
    fps = {0: 11, 1: 11, 2: 22, 3: 22}  # stage 0 on ranks 0, 1; stage 1 on 2, 3
    values = {11: 4.0, 22: 9.0}
    params = {11: 100, 22: 50}
    for rank in (0, 1, 2):
        out = lay.norms(
            rank, 5, [entry("host", fps[rank], values[fps[rank]], params[fps[rank]])], 4, 0.0
        )
        assert out == []  # rank 3 has not reported step 5
    out = lay.norms(3, 5, [entry("host", 22, 9.0, 50)], 4, 0.0)
    p = published(out, "host")
    assert (p.step, p.sq, p.params, p.inconsistent) == (5, 13.0, 150, None)
    assert lay.groups["host"].params == 150  # known from the holders alone


def test_a_rank_that_does_not_hold_a_group_is_not_waited_for():
    lay = run_layout()
    # The seed lives on stage 0 (rank 0) only; rank 1 lists its groups without it.
    assert lay.norms(1, 0, [entry("host", 22, 9.0)], 2, 0.0) == []
    out = lay.norms(0, 0, [entry("host", 11, 4.0), entry("s", 33, 1.0)], 2, 0.0)
    assert published(out, "host").sq == 13.0
    assert published(out, "s").sq == 1.0 and published(out, "s").inconsistent is None


def test_nothing_is_published_before_every_rank_of_the_world_announced_its_groups():
    lay = run_layout()
    # A world of 2; rank 1 not heard yet: it may hold the other stage.
    assert lay.norms(0, 0, [entry("host", 11, 4.0)], 2, now=0.0) == []
    out = lay.norms(1, 0, [entry("host", 22, 9.0)], 2, now=1.0)
    assert published(out, "host").sq == 13.0
    # A rank's Hello announces its groups before any capture.
    lay = run_layout()
    lay.announce(1, [("host", 22, 50, ())], 2, now=0.0)
    out = lay.norms(0, 0, [entry("host", 11, 4.0)], 2, now=0.0)
    assert out == []  # rank 1 holds the host: its part of step 0 is awaited
    assert lay.groups["host"].params == 60


def test_collectors_on_some_ranks_only_are_counted_over_the_ranks_heard_after_the_window():
    lay = run_layout()
    assert lay.norms(0, 0, [entry("host", 11, 4.0)], 4, now=100.0) == []
    done, given_up = lay.tick(4, now=100.0 + WINDOW - 1)
    assert done == [] and given_up == 0
    done, given_up = lay.tick(4, now=100.0 + WINDOW)
    assert published(done, "host").sq == 4.0 and given_up == 0
    out = lay.norms(0, 1, [entry("host", 11, 5.0)], 4, now=100.0 + WINDOW + 1)
    assert published(out, "host").sq == 5.0  # from now on at once


def test_a_step_whose_holders_keep_reporting_outlives_the_window():
    # Holders reporting one after another, each within the window of the previous one.
    lay = run_layout()
    for rank in range(3):  # every holder known
        lay.norms(rank, 0, [entry("host", 11 * (rank + 1), 1.0)], 3, now=0.0)
    lay.norms(0, 1, [entry("host", 11, 4.0)], 3, now=1.0)
    lay.norms(1, 1, [entry("host", 22, 9.0)], 3, now=WINDOW)
    done, given_up = lay.tick(3, now=WINDOW + 2.0)  # past the first report's window
    assert done == [] and given_up == 0 and lay.incomplete() == 0
    out = lay.norms(2, 1, [entry("host", 33, 1.0)], 3, now=WINDOW + 3.0)
    assert published(out, "host").sq == 14.0
    lay.norms(0, 2, [entry("host", 11, 4.0)], 3, now=WINDOW + 4.0)
    done, given_up = lay.tick(3, now=2 * WINDOW + 4.5)  # nothing since: given up
    assert given_up == 1 and lay.incomplete() == 1


def test_a_step_short_of_a_holder_past_the_window_is_given_up_and_its_straggler_dropped():
    lay = run_layout()
    lay.norms(0, 0, [entry("host", 11, 4.0)], 2, now=0.0)
    lay.norms(1, 0, [entry("host", 22, 9.0)], 2, now=0.0)
    lay.norms(0, 1, [entry("host", 11, 4.0)], 2, now=1.0)
    done, given_up = lay.tick(2, now=1.0 + WINDOW + 0.5)
    assert done == [] and given_up == 1 and lay.incomplete() == 1
    assert lay.norms(1, 1, [entry("host", 22, 9.0)], 2, now=40.0) == []  # no partial sum
    assert lay.dropped_reports() == 1
    # A rank's repeat of a step it reported counts once.
    lay.norms(0, 2, [entry("host", 11, 4.0)], 2, now=41.0)
    assert lay.norms(0, 2, [entry("host", 11, 99.0)], 2, now=41.0) == []
    assert published(lay.norms(1, 2, [entry("host", 22, 9.0)], 2, now=41.0), "host").sq == 13.0
    assert lay.dropped_reports() == 2


def test_a_rank_leaving_completes_what_it_did_not_hold_and_gives_up_what_lacks_its_part():
    lay = run_layout()
    for rank, fp in ((0, 11), (1, 11), (2, 22)):
        lay.announce(rank, [("host", fp, 10, ())], 3, now=0.0)
    lay.norms(
        0, 0, [entry("host", 11, 4.0)], 3, now=0.0
    )  # step 0: rank 1 (a replica) and 2 missing
    lay.norms(2, 0, [entry("host", 22, 9.0)], 3, now=0.0)
    lay.norms(0, 1, [entry("host", 11, 4.0)], 3, now=0.0)  # step 1: stage 1's part missing
    lay.norms(1, 1, [entry("host", 11, 4.0)], 3, now=0.0)
    out = lay.leave(1, 3, now=0.0)  # a replica leaves: step 0 has its class already
    assert [(n, p.step, p.sq) for n, p in out] == [("host", 0, 13.0)]
    out = lay.leave(2, 3, now=0.0)  # the only holder of stage 1 leaves: step 1 never whole
    assert out == [] and lay.incomplete() == 1


def test_empty_parts_count_nothing_and_a_group_without_gradient_anywhere_is_none():
    lay = run_layout()
    # HSDP: the replicas at replicate coordinate 1 count nothing (one empty fingerprint).
    out = []
    for rank, (fp, sq) in enumerate([(11, 4.0), (22, 9.0), (33, 0.0), (33, 0.0)]):
        out += lay.norms(rank, 0, [entry("w", fp, sq, 0 if fp == 33 else 5)], 4, 0.0)
    p = published(out, "w")
    assert (p.sq, p.params, p.inconsistent) == (13.0, 10, None)
    out = []
    for rank in range(2):
        out += lay.norms(rank, 0, [entry("g", 7, None)], 2, 0.0)
    assert published(out, "g").sq is None and published(out, "g").inconsistent is None


def test_non_finite_values_travel_and_agreeing_replicas_stay_unflagged():
    lay = run_layout()
    out = []
    for rank, (fp, sq) in enumerate([(11, math.inf), (11, math.inf), (22, 1.0), (22, 1.0)]):
        out += lay.norms(rank, 0, [entry("g", fp, sq)], 4, 0.0)
    p = published(out, "g")
    assert p.sq == math.inf and p.inconsistent is None
    # Two parts exploding at once are no all-reduce's mark: infinities compare with nothing.
    lay = run_layout()
    out = []
    for rank, (fp, sq) in enumerate([(11, math.inf), (22, math.inf)]):
        out += lay.norms(rank, 2, [entry("g2", fp, sq, 1)], 2, 0.0)
    p = published(out, "g2")
    assert (p.sq, p.inconsistent) == (math.inf, None)
    out = []
    for rank, sq in enumerate([math.nan, math.nan]):
        out += lay.norms(rank, 1, [entry("g", 11, sq)], 2, 0.0)
    assert math.isnan(published(out, "g").sq) and published(out, "g").inconsistent is None


# --- the safety net -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "flag"),
    [
        (4.0, None),  # bitwise equal, as all-reduced gradients are
        (4.0 * (1 - 0.9 * REPLICA_RTOL), None),  # another summation order
        (4.0 * (1 - 3 * REPLICA_RTOL), "values"),
        (4.5, "values"),  # weights left out of the all-reduce
        (None, "values"),  # no gradient on one replica
    ],
)
def test_replicas_must_agree_within_the_sum_order_bound(second, flag):
    lay = run_layout()
    lay.norms(0, 0, [entry("g", 11, 4.0)], 2, 0.0)
    p = published(lay.norms(1, 0, [entry("g", 11, second)], 2, 0.0), "g")
    assert p.inconsistent == flag and lay.groups["g"].inconsistent == flag


def test_the_flag_is_the_latest_steps_a_consistent_step_clears_it():
    lay = run_layout()
    lay.norms(0, 0, [entry("g", 11, 4.0)], 2, 0.0)
    assert published(lay.norms(1, 0, [entry("g", 11, 5.0)], 2, 0.0), "g").inconsistent == "values"
    lay.norms(0, 1, [entry("g", 11, 4.0)], 2, 0.0)
    assert published(lay.norms(1, 1, [entry("g", 11, 4.0)], 2, 0.0), "g").inconsistent is None


def test_equal_values_over_different_fingerprints_are_an_all_reduce_over_different_parameters():
    lay = run_layout()
    # DDP around adapters.0 on rank 0 and adapters.1 on rank 1: reduced together.
    lay.norms(0, 0, [entry("adapter", 100, 2.5)], 2, 0.0)
    p = published(lay.norms(1, 0, [entry("adapter", 101, 2.5)], 2, 0.0), "adapter")
    assert p.inconsistent == "contents"
    # Parts whose values differ are parts: summed, unflagged.
    lay.norms(0, 1, [entry("adapter", 100, 2.5)], 2, 0.0)
    p = published(lay.norms(1, 1, [entry("adapter", 101, 3.5)], 2, 0.0), "adapter")
    assert (p.sq, p.inconsistent) == (6.0, None)


def test_a_group_claimed_replicated_over_different_contents_is_flagged():
    lay = run_layout()
    lay.norms(0, 0, [entry("g", 11, 4.0, replica=True)], 2, 0.0)
    p = published(lay.norms(1, 0, [entry("g", 22, 9.0, replica=True)], 2, 0.0), "g")
    assert p.inconsistent == "contents"
    # The claim holds where the contents agree.
    lay = run_layout()
    lay.norms(0, 1, [entry("h", 11, 4.0, replica=True)], 2, 0.0)
    assert (
        published(lay.norms(1, 1, [entry("h", 11, 4.0, replica=True)], 2, 0.0), "h").inconsistent
        is None
    )


def test_fingerprints_that_share_a_parameter_are_not_added():
    # EP with the whole model as host: rank r holds the router (hash 1) and its experts.
    lay = run_layout()
    lay.announce(0, [("host", 11, 30, (1, 10, 11))], 2, now=0.0)
    lay.announce(1, [("host", 22, 30, (1, 20, 21))], 2, now=0.0)
    lay.norms(0, 0, [entry("host", 11, 4.0, 30)], 2, 0.0)
    p = published(lay.norms(1, 0, [entry("host", 22, 9.0, 30)], 2, 0.0), "host")
    assert p.inconsistent == "overlap"
    # Pipeline stages share no parameter: added, unflagged.
    lay = run_layout()
    lay.announce(0, [("host", 11, 30, (1, 10))], 2, now=0.0)
    lay.announce(1, [("host", 22, 30, (2, 20))], 2, now=0.0)
    lay.norms(0, 0, [entry("host", 11, 4.0, 30)], 2, 0.0)
    p = published(lay.norms(1, 0, [entry("host", 22, 9.0, 30)], 2, 0.0), "host")
    assert (p.sq, p.inconsistent) == (13.0, None)
    # Replicas share every parameter but are one fingerprint: one value, unflagged.
    lay = run_layout()
    for rank in (0, 1):
        lay.announce(rank, [("host", 11, 30, (1, 10))], 2, now=0.0)
    lay.norms(0, 0, [entry("host", 11, 4.0, 30)], 2, 0.0)
    p = published(lay.norms(1, 0, [entry("host", 11, 4.0, 30)], 2, 0.0), "host")
    assert (p.sq, p.inconsistent) == (4.0, None)


def test_overlap_follows_the_fingerprints_held_now():
    g = GroupLayout()
    g.sample(11, (1, 10))
    g.sample(22, (1, 20))
    g.hold(0, 11, 5)
    assert not g.overlap()  # one fingerprint held
    g.hold(1, 22, 5)
    assert g.overlap()
    g.leave(1)
    assert not g.overlap()
    g.hold(1, 33, 5)  # a fingerprint without a sample (no Hello seen): not checked
    assert not g.overlap()


def test_a_replica_joining_its_class_mid_step_cannot_be_vouched_for():
    g = GroupLayout()
    g.hold(0, 11, 10)
    g.hold(1, 22, 10)
    assert g.report(0, 0, entry("g", 11, 4.0), 0.0, settled=True) is None
    # Rank 2 appears with rank 0's fingerprint after rank 0's value was taken unkept.
    assert g.report(2, 0, entry("g", 11, 5.0), 0.0, settled=True) is None
    assert g.report(1, 0, entry("g", 22, 9.0), 0.0, settled=True) is None  # given up
    assert g.incomplete == 1


# --- through the aggregator -------------------------------------------------------------


def _hello(rank: int, world: int, decls) -> Hello:
    return Hello(
        "r", rank, 1.0, world, "h", 1, "0", "0", tuple(GroupDecl(*d) for d in decls), seq=0
    )


def _norms(rank: int, step: int, world: int, groups) -> Norms:
    return Norms("r", rank, 1.0, step, False, tuple(GroupNorm(*g) for g in groups), world, step + 1)


def test_exposition_withholds_an_inconsistent_group_and_its_ratio_and_logs_once(make_agg, caplog):
    agg, _ = make_agg()
    caplog.set_level(logging.WARNING, logger="test.aggregator")
    for rank in (0, 1):
        agg.apply(
            _hello(rank, 2, [("host", "host", 100, False, 7), ("s", "seed", 10, True, 8)]), 0.0
        )
    for step in range(3):
        for rank in (0, 1):
            host_sq = 4.0 if rank == 0 else 4.0 + step + 1  # the host's replicas disagree
            agg.apply(
                _norms(
                    rank,
                    step,
                    2,
                    [
                        ("host", "host", 100, host_sq, 0, True, False, 7),
                        ("s", "seed", 10, 1.0, 0, True, True, 8),
                    ],
                ),
                float(step),
            )
    s = parse(exposition(agg))
    assert get(s, "esper_group_inconsistent", run="r", group="host") == 1
    assert get(s, "esper_group_inconsistent", run="r", group="s") == 0
    assert get(s, "esper_grad_norm", run="r", group="host") is None
    assert get(s, "esper_group_has_gradient", run="r", group="host") is None
    assert get(s, "esper_seed_grad_ratio", run="r", seed="s") is None  # its host is no number
    assert get(s, "esper_grad_norm", run="r", group="s") == 1.0
    assert get(s, "esper_group_last_step", run="r", group="host") == 2
    lines = [r.getMessage() for r in caplog.records if "group inconsistent" in r.getMessage()]
    assert len(lines) == 1 and "group=host reason=values step=0" in lines[0], lines


def test_exposition_sums_parts_with_parameters_and_ratio_of_the_whole(make_agg):
    agg, _ = make_agg()
    agg.apply(_hello(0, 2, [("host", "host", 100, False, 7), ("s", "seed", 10, True, 8)]), 0.0)
    agg.apply(_hello(1, 2, [("host", "host", 300, False, 9)]), 0.0)
    s = parse(exposition(agg))
    assert get(s, "esper_group_parameters", run="r", group="host") == 400  # before any step
    assert get(s, "esper_grad_norm", run="r", group="host") is None
    agg.apply(
        _norms(
            0,
            0,
            2,
            [
                ("host", "host", 100, 4.0, 0, True, False, 7),
                ("s", "seed", 10, 1.0, 0, True, True, 8),
            ],
        ),
        1.0,
    )
    assert get(parse(exposition(agg)), "esper_grad_norm", run="r", group="host") is None  # waits
    agg.apply(_norms(1, 0, 2, [("host", "host", 300, 12.0, 0, True, False, 9)]), 1.0)
    s = parse(exposition(agg))
    assert get(s, "esper_grad_norm", run="r", group="host") == 4.0
    assert get(s, "esper_group_parameters", run="r", group="host") == 400
    assert get(s, "esper_seed_grad_ratio", run="r", seed="s") == pytest.approx(
        seed_ratio(1.0, 10, 16.0, 400), rel=1e-12
    )


def test_schema_2_groups_keep_their_meaning_beside_fingerprinted_ones(make_agg):
    agg, _ = make_agg()
    # A group without fingerprint from two ranks: replicated as before, the latest step's.
    for rank, (step, sq) in enumerate([(3, 4.0), (4, 9.0)]):
        agg.apply(
            Norms(
                "r",
                rank,
                1.0,
                step,
                False,
                (GroupNorm("old", "group", 5, sq, 0, False, False),),
                2,
                None,
            ),
            0.0,
        )
    s = parse(exposition(agg))
    assert get(s, "esper_grad_norm", run="r", group="old") == 3.0
    assert get(s, "esper_group_inconsistent", run="r", group="old") == 0


def test_steps_waiting_are_bounded_over_every_run_and_freed_with_a_run():
    import gc

    from esper_telemetry.daemon.layout import MAX_PENDING_STEPS, Waiting

    waiting = Waiting(cap=300)
    a = RunLayout(WINDOW, 4096, waiting)
    b = RunLayout(WINDOW, 4096, waiting)
    # Run a's rank 0 sends a collector's largest batch first: every step waits whole.
    for step in range(MAX_PENDING_STEPS):
        a.norms(0, step, [entry("host", 11, 1.0)], 2, now=0.0)
    assert waiting.count == MAX_PENDING_STEPS and a.incomplete() == 0
    # Run b's steps take what is left of the budget, then give up their own oldest.
    for step in range(100):
        b.norms(0, step, [entry("host", 11, 1.0)], 2, now=0.0)
    assert waiting.count == 300 and b.incomplete() == 100 - (300 - MAX_PENDING_STEPS)
    # A group with nothing waiting cannot open a step while the budget is full: counted.
    b.norms(0, 0, [entry("seed", 12, 1.0)], 2, now=0.0)
    assert waiting.count == 300 and b.group("seed").incomplete == 1
    # Completed steps free their place; a run that goes frees what it held.
    for step in range(MAX_PENDING_STEPS):
        a.norms(1, step, [entry("host", 22, 2.0)], 2, now=0.0)
    assert waiting.count == 300 - MAX_PENDING_STEPS and a.incomplete() == 0
    del b
    gc.collect()
    assert waiting.count == 0


def test_a_step_completed_by_a_goodbye_keeps_the_overlap_its_leaving_rank_showed():
    # Experts split over two ranks with a router on both, in one group: their Hellos'
    # samples share a parameter. Both report a step that waits (a third rank of the world
    # never announced); rank 0 says goodbye past the window, which completes the step with
    # the ranks heard. Rank 0's sample leaves with it: the step must still be flagged.
    lay = run_layout()
    lay.announce(0, [("host", 11, 10, (1, 2))], 3, now=0.0)
    lay.announce(1, [("host", 22, 10, (2, 3))], 3, now=0.0)
    lay.norms(0, 1, [entry("host", 11, 4.0)], 3, now=1.0)
    assert lay.norms(1, 1, [entry("host", 22, 9.0)], 3, now=1.0) == []  # waits
    out = lay.leave(0, 3, now=WINDOW + 5.0)
    step = published(out, "host")
    assert step is not None and step.sq == 13.0 and step.inconsistent == "overlap"
