"""The run table: who gets a place when it is full, what stays visible after a run ends,
and the step each group's latest capture belongs to. Read from the exposition, as a scrape
would see it; time is the fake clock's."""

from __future__ import annotations

import time

import pytest
from daemon_support import (
    exposition,
    get,
    gn,
    goodbye,
    heartbeat,
    hello,
    host_seed,
    names,
    norms,
    parse,
)

from esper_telemetry.daemon.aggregator import ESTABLISHED_AFTER_S, YOUNG_IDLE_S
from esper_telemetry.daemon.config import ConfigError, parse_args


def expose(agg):
    return parse(exposition(agg))


def runs_in(samples):
    return {dict(labels)["run"] for labels in names(samples, "esper_captures_total")}


def evicted(samples, reason):
    return get(samples, "esper_daemon_runs_evicted_total", reason=reason)


# --- admission -------------------------------------------------------------------------


def test_a_full_table_of_runs_without_norms_makes_room_for_a_new_run(make_agg, clock):
    agg, _ = make_agg(max_runs=3)
    agg.apply_batch([host_seed(run="real-old")], clock())  # sent norms: keeps its place
    clock.advance(1)
    agg.apply_batch([hello(run="junk-1")], clock())
    clock.advance(1)
    agg.apply_batch([hello(run="junk-2")], clock())
    clock.advance(1)
    agg.apply_batch([heartbeat(run="junk-1")], clock())  # junk-2 is now the longest idle
    clock.advance(1)
    agg.apply_batch([hello(run="new")], clock())
    s = expose(agg)
    assert runs_in(s) == {"real-old", "junk-1", "new"}
    assert evicted(s, "no_captures") == 1
    assert evicted(s, "idle") == evicted(s, "ended") == 0
    assert get(s, "esper_daemon_overflow_total", what="runs") == 0
    # The newcomer's captures are exported.
    agg.apply_batch([host_seed(run="new", host_sq=9.0)], clock())
    assert get(expose(agg), "esper_grad_norm", run="new", group="host") == 3.0


def test_a_run_that_sent_norms_gives_way_only_once_idle_for_evict_after(make_agg, clock):
    agg, _ = make_agg(max_runs=2, evict_after_s=60.0)
    agg.apply_batch([host_seed(run="a"), host_seed(run="b")], clock())
    clock.advance(10)  # both established: heard from over 10 s
    agg.apply_batch([host_seed(run="a")], clock())
    clock.advance(10)
    agg.apply_batch([host_seed(run="b")], clock())
    clock.advance(40)  # a idle 50 s, b 40 s: both still protected
    agg.apply_batch([host_seed(run="c"), heartbeat(run="c")], clock())
    s = expose(agg)
    assert runs_in(s) == {"a", "b"}
    assert get(s, "esper_daemon_overflow_total", what="runs") == 2  # both events refused
    assert evicted(s, "idle") == 0
    clock.advance(15)  # a idle 65 s
    agg.apply_batch([host_seed(run="c")], clock())
    s = expose(agg)
    assert runs_in(s) == {"b", "c"}
    assert evicted(s, "idle") == 1
    assert get(s, "esper_captures_total", run="c") == 1
    assert get(s, "esper_captures_total", run="b") == 2  # untouched


def test_evict_after_zero_makes_the_longest_idle_run_give_way(make_agg, clock):
    agg, _ = make_agg(max_runs=2, evict_after_s=0.0)
    agg.apply_batch([host_seed(run="a")], clock())
    clock.advance(1)
    agg.apply_batch([host_seed(run="b")], clock())
    clock.advance(1)
    agg.apply_batch([host_seed(run="a")], clock())  # b is now the longest idle
    clock.advance(1)
    agg.apply_batch([host_seed(run="c")], clock())
    s = expose(agg)
    assert runs_in(s) == {"a", "c"}
    assert evicted(s, "idle") == 1


def test_ended_runs_give_way_first_in_the_order_they_ended(make_agg, clock):
    agg, _ = make_agg(max_runs=3, ended_retention_s=300.0)
    agg.apply_batch([hello(run="quiet")], clock())  # never sent norms: the next candidate
    agg.apply_batch([host_seed(run="e1"), host_seed(run="e2")], clock())
    agg.apply_batch([goodbye(run="e2")], clock())
    clock.advance(1)
    agg.apply_batch([goodbye(run="e1")], clock())
    agg.apply_batch([hello(run="new")], clock())
    s = expose(agg)
    assert runs_in(s) == {"quiet", "e1", "new"}
    assert (evicted(s, "ended"), evicted(s, "no_captures")) == (1, 0)


def test_a_junk_flood_does_not_lock_out_a_collector_that_arrives_after_it(make_agg, clock):
    # Issue 10: 50,000 junk run names used to fill the table for the whole TTL, and a real
    # collector arriving then saw 0 captures.
    agg, stats = make_agg(max_runs=100)
    agg.apply_batch([host_seed(run="training")], clock())
    started = time.perf_counter()
    for i in range(50_000):
        agg.apply_batch([hello(run=f"junk-{i}")], clock())
        if i % 1000 == 0:
            clock.advance(0.01)
    took = time.perf_counter() - started
    agg.apply_batch([hello(run="late")], clock())
    agg.apply_batch([host_seed(run="late", step=7, host_sq=25.0)], clock())
    s = expose(agg)
    assert get(s, "esper_grad_norm", run="late", group="host") == 5.0
    assert get(s, "esper_captures_total", run="late") == 1
    assert get(s, "esper_captures_total", run="training") == 1  # a run with norms kept its place
    assert get(s, "esper_daemon_runs") == 100
    assert evicted(s, "no_captures") == 50_000 - 99 + 1  # 99 junk fit, then one out per name
    assert get(s, "esper_daemon_overflow_total", what="runs") == 0
    assert took < 10.0, f"admission under a flood took {took:.1f} s for 50,000 names"


def test_a_flood_of_runs_sending_norms_gives_way_to_a_real_run_at_once(make_agg, clock):
    # Issue 20: 50,000 junk runs that each send one Norms (or a few, within seconds) held
    # the table for --run.evict-after-seconds, and for ever if repeated.
    agg, stats = make_agg(max_runs=100, evict_after_s=60.0)
    agg.apply_batch([host_seed(run="training")], clock())
    clock.advance(ESTABLISHED_AFTER_S)
    agg.apply_batch([host_seed(run="training", step=2)], clock())  # established
    started = time.perf_counter()
    for i in range(50_000):
        agg.apply_batch([host_seed(run=f"junk-{i}")] * (1 + i % 3), clock())
        if i % 1000 == 0:
            clock.advance(0.1)  # a 5 s flood: junk quiet for a second gives way to junk
    took = time.perf_counter() - started
    flooded = evicted(expose(agg), "young")
    assert 0 < flooded < 50_000 - 99
    clock.advance(YOUNG_IDLE_S)
    agg.apply_batch([host_seed(run="late", step=7, host_sq=25.0)], clock())
    s = expose(agg)
    assert get(s, "esper_grad_norm", run="late", group="host") == 5.0
    assert get(s, "esper_captures_total", run="training") == 2  # established: kept
    assert evicted(s, "young") == flooded + 1  # the late run took a junk run's place
    assert get(s, "esper_daemon_runs") == 100
    assert took < 10.0, f"admission under a flood took {took:.1f} s for 50,000 names"


def test_a_young_run_gives_way_after_idle_ones_and_is_established_after_ten_seconds(
    make_agg, clock
):
    agg, _ = make_agg(max_runs=3, evict_after_s=60.0)
    agg.apply_batch([host_seed(run="old")], clock())
    clock.advance(ESTABLISHED_AFTER_S)
    agg.apply_batch([host_seed(run="old")], clock())  # established, then idle
    agg.apply_batch([host_seed(run="new")], clock())
    clock.advance(61)
    agg.apply_batch([host_seed(run="new")], clock())  # established by its span
    agg.apply_batch([host_seed(run="young")], clock())
    agg.apply_batch([host_seed(run="next")], clock())  # "old", idle 61 s, goes first
    s = expose(agg)
    assert runs_in(s) == {"new", "young", "next"}
    assert (evicted(s, "idle"), evicted(s, "young")) == (1, 0)
    agg.apply_batch([host_seed(run="last")], clock())  # young but not quiet: refused
    assert get(expose(agg), "esper_daemon_overflow_total", what="runs") == 1
    clock.advance(YOUNG_IDLE_S)
    agg.apply_batch([host_seed(run="next")], clock())
    agg.apply_batch([host_seed(run="last")], clock())  # then the quiet young runs go
    s = expose(agg)
    assert runs_in(s) == {"new", "next", "last"}
    assert evicted(s, "young") == 1


def test_a_refused_flood_scans_the_table_once_per_turn(make_agg, clock):
    agg, stats = make_agg(max_runs=2000)
    for i in range(2000):
        agg.apply_batch([host_seed(run=f"live-{i}")], clock())
    clock.advance(ESTABLISHED_AFTER_S)
    for i in range(2000):
        agg.apply_batch([host_seed(run=f"live-{i}")], clock())  # established: kept
    started = time.perf_counter()
    agg.apply_batch([hello(run=f"junk-{i}") for i in range(20_000)], clock())
    took = time.perf_counter() - started
    assert stats.overflow["runs"] == 20_000
    assert took < 2.0, f"20,000 refusals against 2,000 live runs took {took:.1f} s"


# --- ended runs ------------------------------------------------------------------------


def test_an_ended_run_keeps_its_final_values_for_the_retention_marked_ended(make_agg, clock):
    agg, stats = make_agg(ended_retention_s=300.0, ttl_s=100.0)
    agg.apply_batch(
        [host_seed(run="short", step=42, host_sq=36.0), heartbeat(run="short")], clock()
    )
    assert get(expose(agg), "esper_run_ended", run="short") == 0
    agg.apply_batch([goodbye(run="short")], clock())
    clock.advance(200)  # past the TTL: an ended run does not expire, it is kept
    agg.tick(clock())
    s = expose(agg)
    assert get(s, "esper_run_ended", run="short") == 1
    assert get(s, "esper_grad_norm", run="short", group="host") == 6.0
    assert get(s, "esper_last_step", run="short") == 42
    assert get(s, "esper_collectors", run="short") == 0
    assert get(s, "esper_daemon_ended_runs_total") == 1
    assert get(s, "esper_daemon_expired_runs_total") == 0
    agg.apply_batch([goodbye(run="short")], clock())  # a repeated goodbye ends nothing twice
    assert stats.ended_runs == 1
    clock.advance(101)  # 301 s after the goodbye
    agg.tick(clock())
    s = expose(agg)
    assert "short" not in runs_in(s)
    assert get(s, "esper_daemon_runs") == 0


def test_retention_zero_drops_an_ended_run_at_its_goodbye(make_agg, clock):
    agg, _ = make_agg(ended_retention_s=0.0)
    agg.apply_batch([host_seed(run="short")], clock())
    agg.apply_batch([goodbye(run="short")], clock())
    s = expose(agg)
    assert runs_in(s) == set()
    assert get(s, "esper_daemon_ended_runs_total") == 1


def test_a_run_heard_from_after_it_ended_starts_again_from_zero(make_agg, clock):
    agg, _ = make_agg(ended_retention_s=300.0)
    agg.apply_batch([host_seed(run="r", step=5), host_seed(run="r", step=6)], clock())
    agg.apply_batch([goodbye(run="r")], clock())
    clock.advance(10)
    agg.apply_batch([hello(run="r")], clock())
    s = expose(agg)
    assert get(s, "esper_run_ended", run="r") == 0
    assert get(s, "esper_captures_total", run="r") == 0
    assert get(s, "esper_collectors", run="r") == 1
    assert get(s, "esper_last_step", run="r") is None
    clock.advance(300)  # the old run's retention is not the new run's end
    agg.tick(clock())
    assert "r" in runs_in(expose(agg))


def test_the_settings_parse_and_refuse_negative_values():
    cfg = parse_args([], environ={})
    assert (cfg.run_ended_retention_s, cfg.run_evict_after_s) == (300.0, 60.0)
    cfg = parse_args(
        ["--run.ended-retention-seconds=0"], environ={"ESPER_RUN_EVICT_AFTER_SECONDS": "5"}
    )
    assert (cfg.run_ended_retention_s, cfg.run_evict_after_s) == (0.0, 5.0)
    with pytest.raises(ConfigError, match="ESPER_RUN_ENDED_RETENTION_SECONDS"):
        parse_args([], environ={"ESPER_RUN_ENDED_RETENTION_SECONDS": "-1"})


# --- the step of each group's latest capture -------------------------------------------


def test_each_group_exports_the_step_of_its_latest_capture(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch(
        [hello(world_size=2, decls=(("host", "host", 400, False), ("shard", "group", 10, False)))],
        clock(),
    )
    s = expose(agg)
    assert names(s, "esper_group_last_step") == {}  # nothing captured yet
    agg.apply_batch(
        [
            norms(
                rank=0,
                step=8,
                groups=(gn("host", 4.0, "host", 400), gn("shard", 1.0, sharded=True)),
            ),
            norms(rank=1, step=8, groups=(gn("shard", 3.0, sharded=True),)),
            norms(
                rank=0,
                step=9,
                groups=(gn("host", 9.0, "host", 400), gn("shard", 1.0, sharded=True)),
            ),
        ],
        clock(),
    )
    s = expose(agg)
    # The host's latest capture is step 9; the sharded group's latest complete step is 8.
    assert get(s, "esper_group_last_step", run="r", group="host") == 9
    assert get(s, "esper_grad_norm", run="r", group="host") == 3.0
    assert get(s, "esper_group_last_step", run="r", group="shard") == 8
    assert get(s, "esper_grad_norm", run="r", group="shard") == 2.0
    assert get(s, "esper_last_step", run="r") == 9
