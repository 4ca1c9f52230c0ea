"""Megatron-core tensor parallelism end to end: rank processes over gloo, a real daemon
process, its exposition and ``latest()`` against the float64 full gradient.

Megatron-core splits weights without DTensors: plain Parameters of one name and one shape
on every rank of the tensor-parallel group, marked ``tensor_model_parallel``; the LayerNorm
and the row layer's bias are the same on each. Before the collector read the mark, the
host's ranks announced one fingerprint and reported different values: the daemon withheld
the host as inconsistent (never a wrong number, but no number). Now each rank counts its
parts and the shared parameters at tensor-parallel rank 0 only, as Megatron's own gradient
norm does, and the daemon adds the parts. The rank side is
``tests/support/megatron_support.py``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from collector_support import rel_err
from daemon_support import get
from layout_checks import RTOL_SQ, check_daemon_exact, ended, reports
from live_daemon import LiveDaemon
from mesh_support import run_ranks
from torch import nn

from esper_telemetry.ratio import seed_ratio

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def four(daemon: LiveDaemon) -> list[dict]:
    return run_ranks(4, ["megatron_tp_dp"], daemon.endpoint, 240.0, "megatron_support.py")


def test_tensor_parallel_parts_are_added_over_one_replica_each(four, daemon):
    # Tensor parallel 2 x data parallel 2 (four ranks, one Megatron-core import each).
    run = "megatron_tp_dp"
    samples, reps = ended(daemon, [run]), reports(four, run)
    check_daemon_exact(samples, run, reps[0])
    ref = reps[0]["ref"]
    # Each tensor-parallel rank holds a part of the host: neither alone is the whole, and
    # adding one replica of each counts the shared LayerNorm and bias once (rank 0's).
    # Replicas of one part agree; summing every rank would count each part twice.
    parts = sorted((r["tp_rank"], r["sq"]["host"]) for r in reps)
    assert parts[0][1] == parts[1][1] and parts[2][1] == parts[3][1]
    assert all(sq < 0.9 * ref["host"] for _, sq in parts)
    assert rel_err(parts[0][1] + parts[2][1], ref["host"]) <= RTOL_SQ
    # The seed is the same on every rank: counted once, exact, with its ratio.
    for r in reps:
        assert rel_err(r["sq"]["s"], ref["s"]) <= RTOL_SQ
        assert r["local"] == {"host": True, "s": True} and r["errors"] == 0
    got = get(samples, "esper_seed_grad_ratio", run=run, seed="s")
    assert got == pytest.approx(seed_ratio(ref["s"], 27, ref["host"], 296), rel=RTOL_SQ)


def test_gradients_kept_in_main_grad_are_said_not_silently_missing(attach, caplog):
    # Megatron-core's DistributedDataParallel (CUDA only) gives every parameter a main_grad,
    # a view of its gradient buffer, adds each gradient into it and sets .grad to None. The
    # groups then have no .grad to read: one warning says why, naming them.
    net = nn.Module()
    net.host, net.seed = nn.Linear(8, 8), nn.Linear(8, 3)
    for p in net.parameters():
        p.main_grad = torch.zeros_like(p)

        def into_main(p: torch.Tensor) -> None:
            p.main_grad.add_(p.grad)
            p.grad = None

        p.register_post_accumulate_grad_hook(into_main)
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        tel = attach(model=net, host="host", seeds={"s": "seed"})
        for step in range(2):
            net.seed(net.host(torch.randn(4, 8))).pow(2).sum().backward()
            tel.capture(step=step)
        assert tel.flush(5.0)
    assert not tel.latest()["host"].has_grad and float(net.host.weight.main_grad.abs().sum()) > 0
    warned = [r.getMessage() for r in caplog.records if "main_grad" in r.getMessage()]
    assert len(warned) == 1 and "['host', 's']" in warned[0], warned
