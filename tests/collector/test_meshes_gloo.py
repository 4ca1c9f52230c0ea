"""Exact norms under real distributed layouts: each gradient element counted once over the world.

Real rank processes on the CPU (gloo) run a forward and backward under FSDP2, HSDP, tensor
parallel, FSDP2 + tensor parallel and a hand-made ``Partial`` gradient, capture, and report
what the collector measured next to the float64 sum of squares of the FULL gradients
(gathered with ``full_tensor()``). For sharded groups the ranks' values of a step are added,
as the daemon does (in process and from the Norms events on a real PULL socket); a
replicated group's value must be the reference on every rank. DDP is covered by
``test_distributed_gloo.py``. One 2-rank and one 4-rank job run every layout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch
from collector_support import Receiver, pull_receiver, rel_err
from mesh_support import run_ranks

from esper_telemetry import Goodbye, Norms
from esper_telemetry.collector.norms import group_sums

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wire() -> Iterator[Receiver]:
    """One PULL socket for the module's jobs: every layout publishes under its own run id."""
    with pull_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def two(wire: Receiver) -> list[dict]:
    return run_ranks(2, ["fsdp2", "tp", "partial", "forced"], wire.endpoint)


@pytest.fixture(scope="module")
def four(wire: Receiver) -> list[dict]:
    return run_ranks(4, ["hsdp", "fsdp2_tp"], wire.endpoint)


def wire_norms(
    wire: Receiver, run: str, world: int, timeout_s: float = 10.0
) -> dict[int, list[Norms]]:
    """The Norms events of ``run`` by rank, once every rank of it said goodbye."""
    deadline = time.monotonic() + timeout_s
    while sum(isinstance(e, Goodbye) and e.run == run for e in wire.events) < world:
        assert time.monotonic() < deadline, f"no goodbye from every rank of {run!r} in {timeout_s}s"
        wire.recv_once(0.05)
    by_rank: dict[int, list[Norms]] = {}
    for e in wire.events:
        if isinstance(e, Norms) and e.run == run:
            by_rank.setdefault(e.rank, []).append(e)
    return by_rank


def by_fingerprint(entries: list) -> tuple[float, int]:
    """The daemon's rule: one value (and element count) per distinct fingerprint, added."""
    firsts = {}
    for g in entries:
        firsts.setdefault(g.fingerprint, g)
    return sum(g.sq for g in firsts.values()), sum(g.params for g in firsts.values())


def check_exact(outs: list[dict], layout: str, wire: Receiver, replicas: dict[str, bool]) -> None:
    """Every group is local on several ranks; the wire's values, one per fingerprint, add up
    to the full gradient's, and so do the elements counted. ``replicas``: per group, whether
    every rank holds all of it (one fingerprint, each rank's value the whole) or parts."""
    reports = [o["report"][layout] for o in outs]
    world = len(reports)
    norms = wire_norms(wire, layout, world)
    assert sorted(norms) == list(range(world)) and all(len(n) == 1 for n in norms.values())
    on_wire = [{g.name: g for g in norms[rank][0].groups} for rank in range(world)]
    for name, replicated in replicas.items():
        ref = reports[0]["ref"][name]
        assert ref > 0 and all(
            rel_err(r["ref"][name], ref) <= 1e-9 for r in reports
        )  # one gradient
        # A rank of several cannot know its value is the group's: local everywhere.
        assert [r["sharded"][name] for r in reports] == [True] * world, name
        assert [w[name].sharded for w in on_wire] == [True] * world, name
        assert [r["local"][name] for r in reports] == [True] * world, name
        fingerprints = {w[name].fingerprint for w in on_wire}
        assert None not in fingerprints
        assert (len(fingerprints) == 1) is replicated, (layout, name, fingerprints)
        total, elements = by_fingerprint([w[name] for w in on_wire])
        assert rel_err(total, ref) <= 1e-5, (layout, name, total, ref)
        assert elements == reports[0]["params"][name], (layout, name)
        if replicated:
            for r, w in zip(reports, on_wire):
                assert rel_err(r["sq"][name], ref) <= 1e-5 and rel_err(w[name].sq, ref) <= 1e-5, (
                    name
                )
        else:  # the in-process values are this rank's parts (masked replicas add 0)
            assert rel_err(sum(r["sq"][name] for r in reports), ref) <= 1e-5, (layout, name)
    assert all(r["errors"] == 0 for r in reports)


def test_fsdp2_two_ranks_add_up_and_latest_is_local(two, wire):
    check_exact(two, "fsdp2", wire, {"host": False, "s": False})
    reports = [o["report"]["fsdp2"] for o in two]
    # Really shards: the ranks' contributions differ, and each is below the whole.
    assert rel_err(reports[0]["sq"]["host"], reports[1]["sq"]["host"]) > 1e-3
    assert all(r["sq"]["host"] < r["ref"]["host"] for r in reports)
    # In process, a sharded group's sq is this rank's contribution: no seed/host ratio of those.
    for r in reports:
        assert r["local"] == {"host": True, "s": True}
        assert r["ratios"] == {}


def test_hsdp_counts_each_replica_once(four, wire):
    # Placements (Replicate(), Shard(0)): summing every rank's shard counted each element twice.
    check_exact(four, "hsdp", wire, {"host": False, "s": False})
    reports = [o["report"]["hsdp"] for o in four]
    # Ranks 0 and 1 (replicate coordinate 0) carry the norm; their replicas add nothing.
    assert reports[2]["sq"]["host"] == 0.0 and reports[3]["sq"]["host"] == 0.0
    assert rel_err(reports[0]["sq"]["host"], reports[1]["sq"]["host"]) > 1e-3


def test_tensor_parallel_counts_replicated_bias_and_plain_layernorm_once(two, wire):
    # host: up (Shard(0)), down.weight (Shard(1)), down.bias (Replicate()), a plain LayerNorm.
    # The seed has no DTensor: every rank holds all of it (one fingerprint, counted once).
    check_exact(two, "tp", wire, {"host": False, "s": True})


def test_fsdp2_with_tensor_parallel_on_a_2d_mesh(four, wire):
    # TP weights are 2-D DTensors; the LayerNorm and the seed are sharded over the dp
    # sub-mesh only, replicated over tp: only tp coordinate 0 counts them.
    check_exact(four, "fsdp2_tp", wire, {"host": False, "s": False})
    reports = [o["report"]["fsdp2_tp"] for o in four]
    assert reports[1]["sq"]["s"] == 0.0 and reports[3]["sq"]["s"] == 0.0  # tp coordinate 1
    assert reports[0]["sq"]["s"] > 0.0 and reports[2]["sq"]["s"] > 0.0


def test_partial_gradient_is_unknown_and_counted_as_an_error(two, wire):
    outs = [o["report"]["partial"]["captures"] for o in two]
    for rank, caps in enumerate(outs):
        for step, c in enumerate(caps[:2]):
            assert c["sq"]["p"] is None and c["has_grad"]["p"] is False, (rank, step)
            assert c["errors"] == step + 1  # each capture counted
            # The other groups are measured as usual (plain: replicated).
            for name in ("host", "q"):
                assert rel_err(c["sq"][name], c["ref"][name]) <= 1e-5
            assert c["sharded"]["p"] is True and c["local"]["p"] is True
            # Only seeds whose value and host's are the groups' own get a ratio: on two
            # ranks no plain group's is known to be (sharded=False would say so).
            assert c["ratios"] == {} and c["local"]["q"] is True and c["local"]["host"] is True
        # Reduced, the same gradient counts once over the world (Replicate: rank 0 only).
        assert caps[2]["errors"] == 2
    assert rel_err(outs[0][2]["sq"]["p"] + outs[1][2]["sq"]["p"], outs[0][2]["ref"]["p"]) <= 1e-5
    assert outs[1][2]["sq"]["p"] == 0.0
    # One clear log line per rank, however many captures failed.
    for o in two:
        lines = [ln for ln in o["stderr"].splitlines() if "UnmeasurableGradient" in ln]
        assert len(lines) == 1 and "'p'" in lines[0] and "Partial" in lines[0], o["stderr"][-2000:]
    norms = wire_norms(wire, "partial", 2)
    for rank in (0, 1):
        by_step = {n.step: {g.name: g for g in n.groups} for n in norms[rank]}
        assert by_step[0]["p"].sq is None and by_step[1]["p"].sq is None
        assert by_step[2]["p"].sq is not None and by_step[0]["q"].sq is not None


def test_forced_sharded_counts_everything_this_rank_holds(two):
    for o in two:
        on, off = o["report"]["forced"]["forced_on"], o["report"]["forced"]["forced_off"]
        # sharded=True without DTensors: the user's own shards, every rank counts all of it.
        assert (
            on["sharded"] == {"mine": True} and rel_err(on["sq"]["mine"], on["ref"]["mine"]) <= 1e-5
        )
        # sharded=False over a DTensor: replicated semantics, nothing left out, no daemon sum.
        assert off["sharded"] == {"w": False} and off["local"] == {"w": False}
        assert rel_err(off["sq"]["w"], off["ref"]["w"]) <= 1e-5 and off["sq"]["w"] > 0
    assert (
        rel_err(
            two[0]["report"]["forced"]["forced_on"]["sq"]["mine"],
            two[1]["report"]["forced"]["forced_on"]["sq"]["mine"],
        )
        > 1e-3
    )  # really each rank's own


def test_tensors_left_out_still_count_as_nonfinite():
    # Per-tensor squares of two groups; the tensors another rank counts are masked out.
    squares = torch.tensor([4.0, float("inf"), 9.0, 16.0, float("nan")], dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 1, 1])
    counted = torch.tensor([True, False, True, False, False])
    sq, nonfinite = group_sums(squares, index, 2, counted).tolist()
    assert sq == [4.0, 9.0]  # no inf*0 NaN from a masked Inf
    assert nonfinite == [1.0, 1.0]  # masked or not, held here and non-finite
    unmasked = group_sums(squares, index, 2).tolist()[0]
    assert math.isinf(unmasked[0]) and math.isnan(unmasked[1])
