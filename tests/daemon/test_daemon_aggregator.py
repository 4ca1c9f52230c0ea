"""The aggregator alone, as the state machine it is: ``apply(event, now)``, ``tick(now)``,
``snapshot()``; time is whatever the test passes (often a fake clock's reading)."""

from __future__ import annotations

import dataclasses
import tracemalloc

import pytest
from daemon_support import gn, goodbye, heartbeat, hello, host_seed, make_limits, norms

from esper_telemetry import DeviceMismatch, IsolationViolation
from esper_telemetry.daemon.aggregator import (
    ESTABLISHED_AFTER_S,
    MAX_KINDS,
    YOUNG_IDLE_S,
    Aggregator,
    Limits,
)
from esper_telemetry.daemon.shards import MAX_PENDING_STEPS
from esper_telemetry.daemon.stats import DaemonStats


def run_of(agg, name="r"):
    runs = {r.name: r for r in agg.snapshot().runs}
    return runs.get(name)


def group_of(agg, group, run="r"):
    return {g.name: g for g in run_of(agg, run).groups}.get(group)


def test_replicated_group_takes_the_latest_capture_from_any_rank(make_agg, clock):
    agg, stats = make_agg()
    agg.apply_batch([host_seed(rank=0, step=1, host_sq=16.0)], clock())
    agg.apply_batch([host_seed(rank=1, step=2, host_sq=9.0, time_=1_700_000_005.0)], clock())
    host = group_of(agg, "host")
    assert (host.sq, host.step, host.captured, host.params, host.role) == (
        9.0,
        2,
        True,
        400,
        "host",
    )
    run = run_of(agg)
    assert (run.captures, run.last_step, run.collector_time) == (2, 2, 1_700_000_005.0)
    assert stats.events == 2


def test_an_older_step_from_another_rank_does_not_move_the_norm_back(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([host_seed(rank=0, step=100, host_sq=16.0)], clock())
    agg.apply_batch(
        [host_seed(rank=1, step=64, host_sq=9.0)], clock()
    )  # rank 1's batch landed late
    assert (group_of(agg, "host").sq, group_of(agg, "host").step) == (16.0, 100)
    assert run_of(agg).last_step == 100
    agg.apply_batch(
        [host_seed(rank=0, step=3, host_sq=4.0)], clock()
    )  # rank 0 restarted from a checkpoint
    assert (group_of(agg, "host").sq, group_of(agg, "host").step) == (4.0, 3)
    assert run_of(agg).last_step == 3


def test_a_capture_without_gradient_is_captured_with_no_sq(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([host_seed(host_sq=4.0)], clock())
    agg.apply_batch([host_seed(step=2, host_sq=None)], clock())
    host = group_of(agg, "host")
    assert host.captured and host.sq is None and host.step == 2


def test_sharded_step_is_published_when_every_rank_of_hello_world_size_reported(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([hello(rank=0, world_size=3)], clock())
    agg.apply_batch([host_seed(rank=0, step=5, host_sq=1.0, seed_sq=None, sharded=True)], clock())
    agg.apply_batch([host_seed(rank=2, step=5, host_sq=2.0, seed_sq=0.5, sharded=True)], clock())
    host = group_of(agg, "host")
    assert host.sq is None and host.step == -1  # declared by hello, step not complete
    agg.apply_batch([host_seed(rank=1, step=5, host_sq=4.0, seed_sq=None, sharded=True)], clock())
    host, seed = group_of(agg, "host"), group_of(agg, "seed")
    assert (host.sq, host.step, host.captured) == (7.0, 5, True)
    assert seed.sq == 0.5  # ranks without gradient add nothing; one with gradient counts
    assert run_of(agg).incomplete_steps == 0


def test_sharded_group_with_no_gradient_on_any_rank_has_none(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([hello(rank=0, world_size=2)], clock())
    for rank in (0, 1):
        agg.apply_batch(
            [host_seed(rank=rank, step=1, host_sq=1.0, seed_sq=None, sharded=True)], clock()
        )
    seed = group_of(agg, "seed")
    assert seed.captured and seed.sq is None


def test_sharded_steps_wait_for_an_unknown_world_size_and_are_counted(make_agg, clock):
    # No Hello seen and collectors without world (schema 2): the ranks heard say nothing
    # about how many there are. Before, "highest rank heard + 1" published step 1 from
    # ranks 0 and 2 as if they were all.
    agg, stats = make_agg()
    agg.apply_batch([heartbeat(rank=0), heartbeat(rank=2)], clock())
    for rank in (0, 2, 1):
        agg.apply_batch([host_seed(rank=rank, step=1, host_sq=1.0, sharded=True)], clock())
        agg.apply_batch([host_seed(rank=rank, step=2, host_sq=2.0, sharded=True)], clock())
    assert group_of(agg, "host").captured is False
    assert stats.world_unknown_steps == 2
    # A schema 3 capture says the world is 4: steps 1 and 2 still lack rank 3.
    agg.apply_batch(
        [host_seed(rank=0, step=3, host_sq=1.0, sharded=True)._replace(world=4)], clock()
    )
    assert group_of(agg, "host").captured is False
    agg.apply_batch([host_seed(rank=3, step=2, host_sq=2.0, sharded=True)], clock())
    host = group_of(agg, "host")
    assert (host.sq, host.step) == (8.0, 2)
    assert stats.world_unknown_steps == 2  # step 3 opened with the world known


def test_a_world_size_learned_later_publishes_the_steps_it_completes(make_agg, clock):
    agg, stats = make_agg()
    for rank in (0, 1):
        agg.apply_batch([host_seed(rank=rank, step=7, host_sq=3.0, sharded=True)], clock())
    assert group_of(agg, "host").captured is False and stats.world_unknown_steps == 1
    agg.apply_batch([hello(rank=1, world_size=2)], clock())
    host = group_of(agg, "host")
    assert (host.sq, host.step) == (6.0, 7)
    assert run_of(agg).incomplete_steps == 0


def test_a_waiting_step_a_rank_outside_the_learned_world_reported_to_is_given_up(make_agg, clock):
    agg, stats = make_agg()
    for rank in (0, 1, 5):
        agg.apply_batch([host_seed(rank=rank, step=7, host_sq=3.0, sharded=True)], clock())
    agg.apply_batch([host_seed(rank=0, step=8, host_sq=3.0, sharded=True)], clock())
    agg.apply_batch([hello(rank=1, world_size=2)], clock())
    assert group_of(agg, "host").captured is False
    assert run_of(agg).incomplete_steps == 1  # step 7 (rank 5 in it); step 8 waits for rank 1
    assert run_of(agg).collectors == 2  # rank 5 left the run
    agg.apply_batch([host_seed(rank=1, step=8, host_sq=1.0, sharded=True)], clock())
    assert group_of(agg, "host").sq == 4.0


def test_ranks_outside_the_world_and_absurd_world_sizes_are_refused_and_counted(make_agg, clock):
    agg, stats = make_agg(max_ranks_per_run=8)
    agg.apply_batch([hello(rank=0, world_size=2)], clock())
    # A rank past the world (by the run's or its own world) would complete a step wrongly.
    agg.apply_batch([host_seed(rank=2, step=1, host_sq=9.0, sharded=True)], clock())
    agg.apply_batch(
        [host_seed(rank=2, step=1, host_sq=9.0, sharded=True)._replace(world=2)], clock()
    )
    agg.apply_batch([heartbeat(rank=3)], clock())
    assert stats.refused == {"rank_outside_world": 3, "world_too_large": 0}
    # A world past --limits.max-ranks-per-run would freeze the run's sharded norms.
    agg.apply_batch([hello(rank=1, world_size=1_000_000)], clock())
    agg.apply_batch(
        [host_seed(rank=1, step=1, host_sq=9.0, sharded=True)._replace(world=9)], clock()
    )
    assert stats.refused == {"rank_outside_world": 3, "world_too_large": 2}
    for rank in (0, 1):
        agg.apply_batch([host_seed(rank=rank, step=1, host_sq=1.0, sharded=True)], clock())
    host = group_of(agg, "host")
    assert (host.sq, host.step) == (2.0, 1)
    assert run_of(agg).collectors == 2


def test_a_rank_reporting_a_step_twice_counts_its_first_report(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([hello(world_size=2)], clock())
    agg.apply_batch([host_seed(rank=0, step=1, host_sq=1.0, sharded=True)], clock())
    agg.apply_batch([host_seed(rank=0, step=1, host_sq=3.0, sharded=True)], clock())
    assert group_of(agg, "host").captured is False
    agg.apply_batch([host_seed(rank=1, step=1, host_sq=4.0, sharded=True)], clock())
    assert group_of(agg, "host").sq == 5.0


def test_incomplete_sharded_step_is_counted_after_the_window_and_not_published(make_agg, clock):
    agg, _ = make_agg(shard_window_s=30.0)
    agg.apply_batch([hello(world_size=2)], clock())
    agg.apply_batch([host_seed(rank=0, step=1, host_sq=1.0, sharded=True)], clock())
    clock.advance(29.0)
    agg.tick(clock())
    assert run_of(agg).incomplete_steps == 0
    clock.advance(2.0)
    agg.tick(clock())
    assert run_of(agg).incomplete_steps == 1
    # The straggler for the given-up step is ignored: no publish, no new pending step.
    agg.apply_batch([host_seed(rank=1, step=1, host_sq=4.0, sharded=True)], clock())
    clock.advance(31.0)
    agg.tick(clock())
    assert group_of(agg, "host").captured is False
    assert run_of(agg).incomplete_steps == 1


def test_pending_sharded_steps_are_capped(make_agg, clock):
    agg, stats = make_agg()
    agg.apply_batch([hello(world_size=2)], clock())
    for step in range(MAX_PENDING_STEPS + 3):
        agg.apply_batch([host_seed(rank=0, step=step, sharded=True)], clock())
    assert run_of(agg).incomplete_steps == 3
    assert stats.overflow["pending_steps"] == 3


def test_run_cap_refuses_new_runs_and_counts_them_existing_unharmed(make_agg, clock):
    agg, stats = make_agg(max_runs=2)
    agg.apply_batch([host_seed(run="a", host_sq=1.0), host_seed(run="b", host_sq=4.0)], clock())
    clock.advance(ESTABLISHED_AFTER_S)  # established: a new run cannot take their places
    agg.apply_batch([host_seed(run="a", host_sq=1.0), host_seed(run="b", host_sq=4.0)], clock())
    agg.apply_batch([host_seed(run="c"), heartbeat(run="c")], clock())
    agg.apply_batch([host_seed(run="a", step=2, host_sq=9.0)], clock())
    assert sorted(r.name for r in agg.snapshot().runs) == ["a", "b"]
    assert stats.overflow["runs"] == 2
    assert group_of(agg, "host", "a").sq == 9.0 and group_of(agg, "host", "b").sq == 4.0


def test_group_cap_refuses_new_groups_and_still_updates_existing_ones(make_agg, clock):
    agg, stats = make_agg(max_groups_per_run=2)
    agg.apply_batch([norms(groups=[gn("a", 1.0), gn("b", 2.0)])], clock())
    agg.apply_batch([norms(step=2, groups=[gn("a", 3.0), gn("c", 5.0), gn("b", 4.0)])], clock())
    groups = {g.name: g.sq for g in run_of(agg).groups}
    assert groups == {"a": 3.0, "b": 4.0}
    assert stats.overflow["groups"] == 1


def test_rank_cap_refuses_events_of_new_ranks(make_agg, clock):
    agg, stats = make_agg(max_ranks_per_run=2)
    agg.apply_batch([heartbeat(rank=0), heartbeat(rank=1)], clock())
    agg.apply_batch([host_seed(rank=7, host_sq=99.0)], clock())
    assert stats.overflow["ranks"] == 1
    assert run_of(agg).collectors == 2
    assert group_of(agg, "host") is None


def test_runs_expire_after_the_ttl_without_events(make_agg, clock):
    agg, stats = make_agg(ttl_s=60.0)
    agg.apply_batch([host_seed(run="quiet"), host_seed(run="busy")], clock())
    clock.advance(50.0)
    agg.apply_batch([heartbeat(run="busy")], clock())
    agg.tick(clock())
    assert len(agg) == 2
    clock.advance(20.0)  # quiet: 70 s since its last event; busy: 20 s
    agg.tick(clock())
    assert [r.name for r in agg.snapshot().runs] == ["busy"]
    assert stats.expired_runs == 1


def test_a_quiet_rank_stops_counting_as_a_collector_as_of_the_latest_time_given(make_agg):
    agg, _ = make_agg(ttl_s=60.0)
    agg.apply_batch([heartbeat(rank=0), heartbeat(rank=1)], 1000.0)
    assert run_of(agg).collectors == 2
    agg.apply(heartbeat(rank=1), 1040.0)
    assert run_of(agg).collectors == 2  # rank 0: 40 s quiet
    agg.apply(heartbeat(rank=1), 1060.5)
    assert run_of(agg).collectors == 1  # rank 0: 60.5 s quiet, without a tick
    agg.tick(1080.0)
    assert run_of(agg).collectors == 1


def test_a_run_that_comes_back_after_expiry_starts_from_zero(make_agg, clock):
    agg, _ = make_agg(ttl_s=10.0)
    agg.apply_batch([host_seed(), host_seed(step=2)], clock())
    assert run_of(agg).captures == 2
    clock.advance(11.0)
    agg.tick(clock())
    agg.apply_batch([host_seed(step=3)], clock())
    assert run_of(agg).captures == 1


def test_goodbye_ends_the_run_when_its_last_rank_says_goodbye(make_agg, clock):
    agg, stats = make_agg(ended_retention_s=0.0)  # kept for a while: test_daemon_runs.py
    agg.apply_batch([host_seed(rank=0), host_seed(rank=1)], clock())
    agg.apply_batch([goodbye(rank=0)], clock())
    assert run_of(agg).collectors == 1
    agg.apply_batch([goodbye(rank=1)], clock())
    assert run_of(agg) is None
    assert (stats.ended_runs, stats.expired_runs) == (1, 0)
    agg.apply_batch([goodbye(run="never-seen")], clock())
    assert len(agg) == 0 and stats.ended_runs == 1


def test_dropped_events_sum_latest_counts_over_ranks_and_survive_a_collector_restart(
    make_agg, clock
):
    agg, _ = make_agg()
    agg.apply_batch([heartbeat(rank=0, dropped=5), heartbeat(rank=1, dropped=3)], clock())
    agg.apply_batch([heartbeat(rank=0, dropped=7)], clock())
    assert run_of(agg).dropped == 10
    agg.apply_batch([heartbeat(rank=0, dropped=2)], clock())  # rank 0 restarted, counting from zero
    assert run_of(agg).dropped == 12


def test_dropped_counts_of_a_new_rank_are_not_added_twice_when_departed_ranks_fill_the_cap(
    make_agg, clock
):
    agg, _ = make_agg(max_ranks_per_run=2)
    agg.apply_batch([heartbeat(rank=0, dropped=5), heartbeat(rank=1, dropped=3)], clock())
    agg.apply_batch([goodbye(rank=0)], clock())  # rank 0 leaves; rank 1 keeps the run alive
    agg.apply_batch([heartbeat(rank=2, dropped=4)], clock())
    agg.apply_batch(
        [heartbeat(rank=2, dropped=4)], clock()
    )  # the same running total again: nothing new
    assert run_of(agg).dropped == 12


def test_violations_count_by_kind_and_track_the_highest_step(make_agg, clock):
    agg, stats = make_agg()

    def v(step, kind="gradient"):
        return IsolationViolation("r", 0, 1.0, step, "seed", kind, "x", 0.5)

    agg.apply_batch([host_seed(step=4), v(4), v(3, "structural"), v(4)], clock())
    seed = group_of(agg, "seed")
    assert seed.violations == {"gradient": 2, "structural": 1}
    assert seed.violation_step == 4
    agg.apply_batch([v(5, f"k{i}") for i in range(MAX_KINDS)], clock())
    assert len(group_of(agg, "seed").violations) == MAX_KINDS
    assert stats.overflow["label_values"] == 2


def test_device_mismatch_and_nonfinite_counts(make_agg, clock):
    agg, _ = make_agg()
    dm = DeviceMismatch("r", 0, 1.0, "split", "host", ("cpu", "cuda:0"))
    agg.apply_batch([dm, dm, DeviceMismatch("r", 0, 1.0, "moved", "seed", ("cuda:0",))], clock())
    agg.apply_batch([norms(groups=[gn("a", 1.0, nonfinite=2), gn("b", 1.0)])], clock())
    agg.apply_batch([norms(step=2, groups=[gn("a", 1.0, nonfinite=1), gn("b", 1.0)])], clock())
    agg.apply_batch([norms(step=3, groups=[gn("a", 1.0), gn("b", 1.0)])], clock())
    assert run_of(agg).device_mismatch == {"split": 2, "moved": 1}
    assert {g.name: g.nonfinite for g in run_of(agg).groups} == {"a": 2, "b": 0}


def test_memory_stays_flat_under_a_flood_of_run_names(make_agg, clock):
    agg, stats = make_agg(max_runs=10)
    # Traced from the start: the runs held at the first snapshot, and their records (whose
    # rings are allocated whole at a group's first step), are freed as flood runs take
    # their place, and that must show.
    tracemalloc.start()
    try:
        for i in range(2_000):
            agg.apply_batch([host_seed(run=f"flood-{i}")], clock())
        # What the runs held is measured, not where the buffer of steps waiting to be read
        # (at most 1,024 records between ticks, test_daemon_steps.py) happens to stand.
        agg.tick(clock())
        before = tracemalloc.take_snapshot()
        for i in range(2_000, 22_000):
            agg.apply_batch([host_seed(run=f"flood-{i}")], clock())
            if i % 2 == 0:
                clock.advance(YOUNG_IDLE_S)  # half of them take a quiet flood run's place
        agg.tick(clock())
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(agg) == 10
    assert stats.overflow["runs"] + stats.evicted["young"] == 21_990
    assert stats.evicted["young"] >= 10_000
    assert growth < 64 * 1024, f"grew {growth} bytes over 20,000 refused runs"


def test_a_bug_surfaces_to_the_caller_with_the_events_counted(make_agg):
    # Not an event: only a daemon bug could get one here. The pump (test_daemon_pump.py)
    # decides what a bug costs; the state machine does not hide it.
    agg, stats = make_agg()
    with pytest.raises(KeyError):
        agg.apply_batch([host_seed(host_sq=25.0), object()], 1000.0)
    assert stats.events == 2 and group_of(agg, "host").sq == 25.0


def test_apply_tick_and_snapshot_with_no_clock_queue_or_loop_of_its_own():
    # Only the times passed in count: nothing expires between calls, however long they take.
    stats = DaemonStats()
    agg = Aggregator(make_limits(ttl_s=60.0, shard_window_s=10.0), stats)
    agg.apply(hello(world_size=2), 100.0)
    agg.apply(host_seed(rank=0, step=1, host_sq=1.0, sharded=True), 100.0)
    agg.apply(host_seed(rank=0, step=2, host_sq=1.0, sharded=True), 105.0)
    agg.tick(110.0)  # step 1 has waited exactly the window: not yet late
    assert run_of(agg).incomplete_steps == 0
    agg.tick(110.5)
    assert run_of(agg).incomplete_steps == 1  # step 1 given up; step 2 still waits
    agg.tick(115.5)
    assert run_of(agg).incomplete_steps == 2
    before = agg.snapshot()
    assert agg.snapshot() == before  # reading changes nothing
    agg.tick(165.0)  # 60 s after the run's last event: not yet expired
    assert len(agg) == 1 and stats.expired_runs == 0
    agg.tick(165.01)
    assert len(agg) == 0 and stats.expired_runs == 1
    assert [r.name for r in before.runs] == ["r"]  # a snapshot is detached from live state
    assert (before.queue_length, before.queue_capacity) == (None, None)  # not the aggregator's
    assert stats.events == 3


def test_limits_have_no_defaults_of_their_own():
    # The defaults are the configuration's (one declaration); Limits only carries them.
    with pytest.raises(TypeError):
        Limits()  # type: ignore[call-arg]
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(Limits))


def test_a_violation_still_counts_for_isolation_when_its_kind_is_refused_by_the_cap(
    make_agg, clock
):
    # A full set of (junk) kinds bounds the label values, not the evidence: a violation of
    # a refused kind must still mark its step, or esper_isolation_ok hides a real leak.
    agg, stats = make_agg()

    def v(step, kind):
        return IsolationViolation("r", 0, 1.0, step, "seed", kind, "x", None)

    agg.apply_batch([host_seed(step=1)] + [v(1, f"junk{i}") for i in range(MAX_KINDS)], clock())
    agg.apply_batch([host_seed(step=2), v(2, "gradient")], clock())
    seed = group_of(agg, "seed")
    assert "gradient" not in seed.violations and stats.overflow["label_values"] == 1
    assert seed.violation_step == 2
