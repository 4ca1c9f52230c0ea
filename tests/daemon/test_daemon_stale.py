"""Stale groups: a group its collector can no longer follow shows no numbers, only that it is stale.

The collector reports, once, a ``DeviceMismatch`` of kind ``stale`` for such a group; a
later ``moved`` for the same group (or a ``Hello`` declaring it: a collector attaching anew)
says it is followed again. Meanwhile the daemon exports no norm, no gradient flag and no
seed ratio for it (a value that is not known is not a number), and ``esper_group_stale`` 1.
"""

from __future__ import annotations

import math

from daemon_support import exposition, get, gn, hello, host_seed, names, norms, parse

from esper_telemetry import DeviceMismatch, decode, encode
from esper_telemetry.daemon.aggregator import MAX_KINDS
from esper_telemetry.daemon.exporter import MISMATCH_KINDS


def stale(group, run="r", rank=0):
    return DeviceMismatch(run, rank, 1.0, "stale", group, ())


def moved(group, run="r", rank=0):
    return DeviceMismatch(run, rank, 1.0, "moved", group, ("cuda:0",))


def expose(agg):
    return parse(exposition(agg))


def groups_of(agg, run="r"):
    return {g.name: g for r in agg.snapshot().runs if r.name == run for g in r.groups}


def test_stale_is_a_mismatch_kind_created_at_zero(make_agg, clock):
    assert "stale" in MISMATCH_KINDS
    agg, _ = make_agg()
    agg.apply_batch([host_seed()], clock())
    s = expose(agg)
    assert get(s, "esper_device_mismatch_total", run="r", kind="stale") == 0
    assert {dict(k)["group"]: v for k, v in names(s, "esper_group_stale").items()} == {
        "host": 0,
        "seed": 0,
    }
    agg.apply_batch([stale("seed")], clock())
    assert get(expose(agg), "esper_device_mismatch_total", run="r", kind="stale") == 1


def test_a_stale_seed_has_no_norm_gradient_flag_or_ratio_until_moved(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([hello(), host_seed(step=1, host_sq=16.0, seed_sq=4.0)], clock())
    # Wire-decoded, as the daemon receives it.
    agg.apply_batch(decode(encode([stale("seed"), host_seed(step=2, seed_sq=None)])), clock())
    assert groups_of(agg)["seed"].stale and not groups_of(agg)["host"].stale
    s = expose(agg)
    assert get(s, "esper_group_stale", run="r", group="seed") == 1
    assert get(s, "esper_group_stale", run="r", group="host") == 0
    assert get(s, "esper_grad_norm", run="r", group="seed") is None
    assert get(s, "esper_group_has_gradient", run="r", group="seed") is None
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") is None
    # The host is followed: its numbers stay.
    assert get(s, "esper_grad_norm", run="r", group="host") == 4.0
    assert get(s, "esper_group_has_gradient", run="r", group="host") == 1
    # Captures while stale do not end it: only a moved for the same group does.
    agg.apply_batch([host_seed(step=3, seed_sq=9.0), moved("host")], clock())
    assert get(expose(agg), "esper_group_stale", run="r", group="seed") == 1
    agg.apply_batch([moved("seed"), host_seed(step=4, host_sq=16.0, seed_sq=1.0)], clock())
    s = expose(agg)
    assert get(s, "esper_group_stale", run="r", group="seed") == 0
    assert get(s, "esper_grad_norm", run="r", group="seed") == 1.0
    assert get(s, "esper_group_has_gradient", run="r", group="seed") == 1
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") == 0.5  # (1/4)*sqrt(4)


def test_a_stale_host_takes_every_seed_ratio_away(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([host_seed(), stale("host")], clock())
    s = expose(agg)
    assert get(s, "esper_group_stale", run="r", group="host") == 1
    assert get(s, "esper_grad_norm", run="r", group="host") is None
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") is None
    assert get(s, "esper_grad_norm", run="r", group="seed") == 2.0  # the seed is followed


def test_stale_hides_a_non_finite_norm_too(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch(
        [
            norms(
                groups=[
                    gn("host", 16.0, "host", 400),
                    gn("seed", math.inf, "seed", 100, nonfinite=1),
                ]
            ),
            stale("seed"),
        ],
        clock(),
    )
    s = parse(exposition(agg))
    assert get(s, "esper_grad_norm", run="r", group="seed") is None
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") is None
    assert get(s, "esper_grad_nonfinite_total", run="r", group="seed") == 1  # counts stay


def test_stale_for_a_group_not_seen_yet_creates_it_and_moved_for_one_does_not(make_agg, clock):
    # A daemon restarted after the collector reported: the stale event is all it knows.
    agg, stats = make_agg()
    agg.apply_batch(
        [stale("adapter"), moved("elsewhere"), DeviceMismatch("r", 0, 1.0, "stale", "", ())],
        clock(),
    )
    assert set(groups_of(agg)) == {"adapter"}
    s = expose(agg)
    assert get(s, "esper_group_stale", run="r", group="adapter") == 1
    assert get(s, "esper_group_has_gradient", run="r", group="adapter") is None
    assert get(s, "esper_device_mismatch_total", run="r", kind="stale") == 2
    assert stats.overflow["groups"] == 0


def test_a_hello_declaring_the_group_starts_it_fresh(make_agg, clock):
    # A collector that restarted (same run) follows what it declares at attach.
    agg, _ = make_agg()
    agg.apply_batch([host_seed(), stale("seed")], clock())
    assert groups_of(agg)["seed"].stale
    agg.apply_batch([hello(decls=(("host", "host", 400, False),))], clock())
    assert groups_of(agg)["seed"].stale  # not declared: still stale
    agg.apply_batch([hello()], clock())
    assert not groups_of(agg)["seed"].stale
    assert get(expose(agg), "esper_grad_norm", run="r", group="seed") == 2.0


def test_staleness_holds_when_the_kind_cap_refuses_to_count_it(make_agg, clock):
    agg, stats = make_agg()
    agg.apply_batch(
        [host_seed()]
        + [DeviceMismatch("r", 0, 1.0, f"k{i}", "host", ()) for i in range(MAX_KINDS)],
        clock(),
    )
    agg.apply_batch([stale("seed")], clock())
    assert stats.overflow["label_values"] == 1
    s = expose(agg)
    assert get(s, "esper_group_stale", run="r", group="seed") == 1
    assert get(s, "esper_device_mismatch_total", run="r", kind="stale") == 0  # precreated
    agg.apply_batch([moved("seed")], clock())
    assert get(expose(agg), "esper_group_stale", run="r", group="seed") == 0


def test_stale_series_end_with_the_run(make_agg, clock):
    agg, _ = make_agg(ttl_s=10.0)
    agg.apply_batch([host_seed(), stale("seed")], clock())
    clock.advance(11.0)
    agg.tick(clock())
    assert names(expose(agg), "esper_group_stale") == {}
