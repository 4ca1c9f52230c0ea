"""FSDP1 (``FullyShardedDataParallel``) end to end: rank processes over gloo, a real daemon
process, its exposition and ``latest()`` against the float64 full gradient.

FSDP1 holds no DTensor: each rank holds a piece of a flattened unit. Exact with no argument,
with ``use_orig_params=True`` (each parameter a 1-D view of the rank's piece) and ``False``
(a group that is an FSDP unit: its FlatParameter), fully sharded and ``HYBRID_SHARD``, and
attached before wrapping. Before each rank said which elements of a parameter it holds, two
halves of one 8x8 weight (32 and 32 elements, one name, one shape) looked like replicas: the
seed was withheld as inconsistent. A group FSDP1 flattened away is an error at attach, or
stale with the reason once it was attached, never "no gradient" in silence. The rank side
is ``tests/support/fsdp1_support.py``.
"""

from __future__ import annotations

import pytest
from collector_support import rel_err
from daemon_support import get
from layout_checks import RTOL_SQ, check_daemon_exact, ended, reports
from live_daemon import LiveDaemon
from mesh_support import run_ranks

from esper_telemetry.ratio import seed_ratio

pytestmark = pytest.mark.slow

TWO = [
    "fsdp1_orig",
    "fsdp1_flat",
    "fsdp1_flat_net",
    "fsdp1_before",
    "fsdp1_flat_before",
    "fsdp1_flat_inside",
    "fsdp1_gpt2",
    "fsdp1_gpt2_flat",
]
FOUR = ["fsdp1_hybrid", "fsdp1_flat_hybrid", "fsdp1_orig_four", "fsdp1_gpt2_four"]
USE_ORIG = "wrap with use_orig_params=True, or make the group an FSDP unit of its own"


@pytest.fixture(scope="module")
def two(daemon: LiveDaemon) -> list[dict]:
    return run_ranks(2, TWO, daemon.endpoint, timeout_s=240.0, script="fsdp1_support.py")


@pytest.fixture(scope="module")
def four(daemon: LiveDaemon) -> list[dict]:
    return run_ranks(4, FOUR, daemon.endpoint, timeout_s=240.0, script="fsdp1_support.py")


@pytest.mark.parametrize("run", ["fsdp1_orig", "fsdp1_flat"])
def test_two_halves_of_one_weight_are_added_not_taken_for_replicas(two, daemon, run):
    samples = ended(daemon, [run])
    rank0, rank1 = reports(two, run)
    check_daemon_exact(samples, run, rank0)
    ref = rank0["ref"]
    # Each rank holds 32 of the seed's 64 weights, both with gradient: neither is the whole.
    assert rank0["params"]["s"] == rank1["params"]["s"] == 32
    for r in (rank0, rank1):
        assert 0.05 * ref["s"] < r["sq"]["s"] < 0.95 * ref["s"]
        assert r["local"] == {"host": True, "s": True}
    assert rel_err(rank0["sq"]["s"] + rank1["sq"]["s"], ref["s"]) <= RTOL_SQ
    got = get(samples, "esper_seed_grad_ratio", run=run, seed="s")
    assert got == pytest.approx(seed_ratio(ref["s"], 64, ref["host"], 128), rel=RTOL_SQ)


def test_a_flat_parameter_counts_its_elements_without_the_padding(two, daemon):
    # 27 seed weights over two ranks: 14 and 13, the second FlatParameter padded to 14.
    samples = ended(daemon, ["fsdp1_flat_net"])
    rank0, rank1 = reports(two, "fsdp1_flat_net")
    check_daemon_exact(samples, "fsdp1_flat_net", rank0)
    assert (rank0["params"]["s"], rank1["params"]["s"]) == (14, 13)


def test_wrapped_after_attach_is_followed_from_the_first_capture_and_said(two, daemon):
    # FSDP1 made every Parameter a view of this rank's piece after attach: what the rank
    # counts is taken again at the first capture (before: both groups withheld).
    samples = ended(daemon, ["fsdp1_before"])
    rank0, rank1 = reports(two, "fsdp1_before")
    check_daemon_exact(samples, "fsdp1_before", rank0)
    assert rank0["params"]["host"] + rank1["params"]["host"] == rank0["ref_params"]["host"]
    assert rank0["stale"] == rank1["stale"] == {"host": False, "s": False}
    # The wrapper is outside the attached model: which elements of a parameter each rank
    # holds is unknown (these pieces differ in size; two halves of one would not), and
    # each rank says so once.
    for out in two:
        warned = [line for line in out["stderr"].splitlines() if "wrapper is not under" in line]
        assert len(warned) == 1 and "['host', 's']" in warned[0], warned


def test_a_group_flattened_after_attach_is_stale_with_the_reason(two, daemon):
    samples = ended(daemon, ["fsdp1_flat_before"])
    reps = reports(two, "fsdp1_flat_before")
    for r in reps:
        assert r["stale"] == {"host": True, "s": True}
    for group in ("host", "s"):
        assert get(samples, "esper_group_stale", run="fsdp1_flat_before", group=group) == 1
        assert get(samples, "esper_grad_norm", run="fsdp1_flat_before", group=group) is None
    for out in two:  # one warning per group and rank, naming the way out
        warned = [line for line in out["stderr"].splitlines() if "no parameters any more" in line]
        assert len(warned) == 2, warned
        assert all(USE_ORIG in line for line in warned)


def test_a_group_inside_a_flat_unit_is_refused_at_attach_with_the_way_out(two):
    for r in reports(two, "fsdp1_flat_inside"):
        assert r["error"].startswith("group 'host' has no parameters: FSDP")
        assert USE_ORIG in r["error"]


@pytest.mark.parametrize("run", ["fsdp1_orig_four", "fsdp1_gpt2_four"])
def test_four_ranks_where_two_hold_none_of_a_parameter_are_exact(four, daemon, run):
    # Two ranks that both hold none of a parameter share nothing: before, both announced it
    # and the daemon withheld the group as overlapping.
    samples = ended(daemon, [run])
    reps = reports(four, run)
    check_daemon_exact(samples, run, reps[0])
    for group in ("host", "s"):
        assert sum(r["params"][group] for r in reps) == reps[0]["ref_params"][group]


@pytest.mark.parametrize("run", ["fsdp1_gpt2", "fsdp1_gpt2_flat"])
def test_gpt2_wrapped_one_unit_per_block_is_exact(two, daemon, run):
    # transformer_auto_wrap_policy: a unit per block, the root holding the embeddings (tied
    # to the head: counted once) and the final norm; the second block a seed by its path.
    samples = ended(daemon, [run])
    rank0, rank1 = reports(two, run)
    check_daemon_exact(samples, run, rank0)
    for group in ("host", "s"):
        assert rank0["params"][group] + rank1["params"][group] == rank0["ref_params"][group]
        assert rel_err(rank0["sq"][group] + rank1["sq"][group], rank0["ref"][group]) <= RTOL_SQ


@pytest.mark.parametrize("run", ["fsdp1_hybrid", "fsdp1_flat_hybrid"])
def test_hybrid_shard_counts_one_replica_of_each_piece(four, daemon, run):
    samples = ended(daemon, [run])
    reps = reports(four, run)
    check_daemon_exact(samples, run, reps[0])
    ref = reps[0]["ref"]
    # Ranks (0, 1) and (2, 3) are the replicas' shard groups: ranks 0 and 2 hold one half,
    # 1 and 3 the other. Adding all four would count every element twice.
    assert reps[0]["sq"] == reps[2]["sq"] and reps[1]["sq"] == reps[3]["sq"]
    for group in ("host", "s"):
        assert rel_err(reps[0]["sq"][group] + reps[1]["sq"][group], ref[group]) <= RTOL_SQ


def test_no_rank_counted_an_error(two, four):
    for outs, layouts in ((two, TWO), (four, FOUR)):
        for layout in layouts:
            if layout != "fsdp1_flat_inside":
                assert all(r["errors"] == 0 for r in reports(outs, layout)), layout
