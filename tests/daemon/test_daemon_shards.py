"""Sharded-step assembly on its own: reports in, a step's totals out once every rank reported."""

from __future__ import annotations

import math

import pytest
import zmq
from daemon_support import get
from live_daemon import live_daemon

from esper_telemetry import GroupNorm, Hello, Norms, encode
from esper_telemetry.daemon.config import Config
from esper_telemetry.daemon.shards import StepAssembly


def test_a_step_is_published_once_the_expected_ranks_reported_with_sums_over_ranks():
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    assert a.add(5, 0, [("host", 1.0), ("seed", None)], expected=3, now=0.0) == (None, False)
    assert a.add(5, 2, [("host", 2.0), ("seed", 0.5)], expected=3, now=1.0) == (None, False)
    assert len(a) == 1
    totals, evicted = a.add(5, 1, [("host", 4.0), ("seed", None)], expected=3, now=2.0)
    # A rank without gradient adds nothing; one rank with gradient makes the sum.
    assert totals == {"host": 7.0, "seed": 0.5} and evicted is False
    assert len(a) == 0 and a.incomplete == 0


def test_a_group_with_no_gradient_on_any_rank_totals_none():
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    a.add(1, 0, [("g", None)], expected=2, now=0.0)
    assert a.add(1, 1, [("g", None)], expected=2, now=0.0).totals == {"g": None}


def test_a_rank_reporting_a_step_twice_counts_once_and_the_repeat_is_counted_dropped():
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    a.add(1, 0, [("g", 1.0)], expected=2, now=0.0)
    assert a.add(1, 0, [("g", 3.0)], expected=2, now=0.0).totals is None  # still one rank
    assert a.dropped_reports == 1
    assert a.add(1, 1, [("g", 4.0)], expected=2, now=0.0).totals == {"g": 5.0}


def test_steps_are_independent_and_the_expected_count_is_the_latest_one_given():
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    a.add(1, 0, [("g", 1.0)], expected=3, now=0.0)
    a.add(2, 0, [("g", 10.0)], expected=3, now=0.0)
    # The world shrank (a new Hello): two reports now complete step 2, step 1 still waits.
    assert a.add(2, 1, [("g", 20.0)], expected=2, now=0.0).totals == {"g": 30.0}
    assert len(a) == 1


def test_a_step_still_short_after_the_window_is_given_up_and_its_straggler_dropped():
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    a.add(1, 0, [("g", 1.0)], expected=2, now=100.0)
    a.add(2, 0, [("g", 1.0)], expected=2, now=110.0)
    assert a.expire(130.0) == [] and a.incomplete == 0  # exactly the window: not late yet
    assert a.expire(130.5) == [1] and a.incomplete == 1
    # The straggler for step 1 neither publishes a partial sum nor opens a new step.
    assert a.add(1, 1, [("g", 4.0)], expected=2, now=131.0) == (None, False)
    assert len(a) == 1
    assert a.expire(140.5) == [2] and a.incomplete == 2 and len(a) == 0


def test_the_window_runs_from_a_steps_latest_report_so_a_backlog_being_read_keeps_it():
    # A daemon reading a 4,096-rank job's backlog: the step's parts keep arriving for longer
    # than the window, each within it of the previous one; then one rank never reports.
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    for rank in range(4):
        a.add(1, rank, [("g", 1.0)], expected=5, now=100.0 + 20.0 * rank)
        assert a.expire(100.0 + 20.0 * rank + 29.0) == []
    assert len(a) == 1 and a.incomplete == 0  # 60 s after its first report, still waiting
    assert a.expire(160.0 + 30.5) == [1] and a.incomplete == 1  # 30 s after its latest


def test_a_collectors_largest_batch_of_steps_waits_whole():
    # One rank's message of 256 steps is read before the others': every step waits.
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    for step in range(256):
        assert a.add(step, 0, [("g", 1.0)], expected=2, now=0.0).evicted is False
    assert len(a) == 256
    assert all(a.add(step, 1, [("g", 2.0)], expected=2, now=1.0).totals for step in range(256))
    assert a.incomplete == 0


def test_a_published_step_is_remembered_so_a_duplicate_does_not_reopen_it():
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    a.add(1, 0, [("g", 1.0)], expected=1, now=0.0)
    assert a.add(1, 0, [("g", 9.0)], expected=1, now=0.0) == (None, False)
    assert len(a) == 0 and a.dropped_reports == 1


def test_pending_steps_are_capped_the_oldest_given_up_first():
    a = StepAssembly(window_s=30.0, max_ranks=4096, max_pending=2)
    a.add(1, 0, [("g", 1.0)], expected=2, now=0.0)
    a.add(2, 0, [("g", 1.0)], expected=2, now=0.0)
    assert a.add(3, 0, [("g", 1.0)], expected=2, now=0.0) == (None, True)
    assert len(a) == 2 and a.incomplete == 1
    assert a.add(1, 1, [("g", 4.0)], expected=2, now=0.0) == (None, False)  # step 1 closed
    assert a.add(2, 1, [("g", 4.0)], expected=2, now=0.0).totals == {"g": 5.0}


def test_closed_steps_are_remembered_only_up_to_the_memory():
    a = StepAssembly(window_s=30.0, max_ranks=4096, closed_memory=2)
    for step in (1, 2, 3):
        a.add(step, 0, [("g", 1.0)], expected=1, now=0.0)
    # Step 1 has been forgotten: a report for it is a new step again; step 3 is remembered.
    assert a.add(1, 0, [("g", 2.0)], expected=1, now=0.0).totals == {"g": 2.0}
    assert a.add(3, 0, [("g", 2.0)], expected=1, now=0.0).totals is None


def test_pending_steps_hold_sums_not_reports_so_a_huge_world_with_a_lagging_rank_stays_small():
    import tracemalloc

    groups = [(f"group-{i:03d}", float(i)) for i in range(128)]
    a = StepAssembly(window_s=30.0, max_ranks=4096)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for step in range(8):  # rank 0 never reports any of them
            for rank in range(1, 4096):
                a.add(step, rank, groups, expected=4096, now=0.0)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(a) == 8 and a.incomplete == 0
    # 8 x 4,095 reports of 128 groups held 290 MB when the reports were kept (2.3 GB at the
    # cap of 64 pending steps); now a sum per group and a bit per rank per step.
    assert held < 1 << 20, f"{held / 2**20:.1f} MiB held by 8 pending steps"
    totals = a.add(0, 0, groups, expected=4096, now=1.0).totals
    assert totals == {name: sq * 4096 for name, sq in groups}


def test_ranks_that_come_and_go_while_no_step_completes_cannot_grow_the_rank_index():
    a = StepAssembly(window_s=30.0, max_ranks=8)
    for rank in range(16):  # twice the cap: the index is full
        a.add(1, rank, [("g", 1.0)], expected=100, now=0.0)
    assert a.add(1, 16, [("g", 1.0)], expected=100, now=0.0) == (None, True)
    assert len(a) == 0 and a.incomplete == 1 and len(a._index) == 0


@pytest.mark.slow
def test_a_real_daemon_assembles_sharded_steps_of_more_ranks_than_the_default_limit(tmp_path):
    # --limits.max-ranks-per-run reaches the sharded-step assembly: with it at the default
    # (4,096) the assembly's rank index gives up at 8,192 ranks and this job never gets a norm.
    world = 2 * Config().max_ranks_per_run + 100
    # One socket sends every rank's report, one message each, in order: the Hello first, so
    # the expected count is the world size and no step is published early.
    frames = [encode(Hello("big", 0, 1.0, world, "h", 1, "0", "", ()), seq=0)]
    frames += [
        encode(
            Norms("big", rank, 1.0, 7, False, (GroupNorm("w", "group", 1, 1.0, 0, True, False),)),
            seq=int(rank == 0),
        )
        for rank in range(world)
    ]
    ctx = zmq.Context()
    with live_daemon(tmp_path / "d.log", f"--limits.max-ranks-per-run={world}") as d:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.SNDTIMEO, 5000)
        sock.connect(d.endpoint)
        try:
            for frame in frames:
                sock.send(frame)
            s = d.scrape_until(
                lambda s: get(s, "esper_daemon_events_total") == len(frames), "every report"
            )
        finally:
            sock.close()
            ctx.term()
    assert get(s, "esper_collectors", run="big") == world
    assert get(s, "esper_daemon_incomplete_steps_total", run="big") == 0
    assert get(s, "esper_group_last_step", run="big", group="w") == 7
    # Each rank's square is 1.0: the sum over ranks is exact in float64.
    assert get(s, "esper_grad_norm", run="big", group="w") == math.sqrt(world)
