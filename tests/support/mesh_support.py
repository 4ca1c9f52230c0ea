"""Real distributed layouts on the CPU (gloo) for the collector's counting rule: both sides.

Parent side: ``run_ranks`` starts ``world`` rank processes (this file as a script) and
returns each rank's JSON report and stderr. Rank side (``main``): each named layout builds a
small model under a real parallelism API, runs forward and backward, captures, and reports
per group what the collector measured (in process) next to the float64 sum of squares of
the FULL gradient (DTensor gradients gathered with ``full_tensor()``). Several layouts run
in one set of processes: starting one costs seconds (importing torch and its distributed
modules on two cores).
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from collector_support import REPO, SUPPORT, free_port, subprocess_env
from torch import nn

# -- parent side ------------------------------------------------------------------------


def run_ranks(
    world: int,
    layouts: Sequence[str],
    endpoint: str,
    timeout_s: float = 90.0,
    script: str = "mesh_support.py",
) -> list[dict]:
    """Run ``layouts`` in ``world`` rank processes; per rank ``{"report": ..., "stderr": ...}``.

    ``script``: the support module whose ``main`` runs them (its ``LAYOUTS`` by name).
    """
    port = free_port()
    args = [str(world), str(port), endpoint, ",".join(layouts)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SUPPORT / script), str(rank), *args],
            cwd=str(REPO),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    outs: list[dict] = []
    try:
        for rank, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"rank {rank} of {world} did not finish within {timeout_s}s"
                ) from None
            assert p.returncode == 0, f"rank {rank} failed:\n{err[-4000:]}"
            outs.append({"report": json.loads(out.strip().splitlines()[-1]), "stderr": err})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


# -- rank side --------------------------------------------------------------------------


class MLP(nn.Module):
    """A transformer-style pre-norm MLP: a LayerNorm, then up and down (both with biases)."""

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    """A host (the MLP) and a seed trained on its detached output; 3 seed rows shard unevenly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank
        self.host = MLP()
        self.seed = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        # Squared outputs: gradients depend on the weights (every parameter gets a real one).
        return h.pow(2).mean() + self.seed(h.detach()).pow(2).mean() * 3.0


def batch(seed: int) -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(100 + seed))


def full_sq(params: Sequence[torch.Tensor]) -> float:
    """The float64 sum of squares of the whole gradient; a collective for DTensor gradients."""
    total = 0.0
    for p in params:
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        total += float(g.detach().to(torch.float64).pow(2).sum())
    return total


def _measure(run: str, endpoint: str, net: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Attach to ``net`` (host, seed ``s``), one real step, one capture; measured and reference."""
    import esper_telemetry as et

    tel = et.attach(model=net, host="host", seeds={"s": "seed"}, endpoint=endpoint, run=run)
    net(x).backward()
    tel.capture(step=0)
    assert tel.flush(10.0)
    res = tel.latest()
    refs = {"host": full_sq(list(net.host.parameters())), "s": full_sq(list(net.seed.parameters()))}
    report = _groups(res, refs)
    report["errors"] = tel.stats()["errors"]
    tel.close()
    return report


def _groups(res: Any, refs: dict[str, float]) -> dict[str, Any]:
    return {
        "sq": {n: g.sq for n, g in res.groups.items()},
        "sharded": {n: g.sharded for n, g in res.groups.items()},
        "local": {n: getattr(g, "local", None) for n, g in res.groups.items()},
        "has_grad": {n: g.has_grad for n, g in res.groups.items()},
        "params": {n: g.params for n, g in res.groups.items()},
        "ratios": res.ratios,
        "ref": refs,
    }


def fsdp2(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """FSDP2 over every rank: placements (Shard(0),)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    net = Net()
    fully_shard(net.host, mesh=mesh)
    fully_shard(net.seed, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return _measure("fsdp2", endpoint, net, batch(rank))


def hsdp(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """HSDP on a 2x2 mesh: placements (Replicate(), Shard(0)); every rank gets its own batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    net = Net()
    fully_shard(net.host, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return _measure("hsdp", endpoint, net, batch(rank))


def _tensor_parallel(mlp: MLP, mesh: Any) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    # down.bias stays Replicate; the LayerNorm is not parallelized (plain tensors).
    parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


def tp(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """Tensor parallel over every rank (same batch everywhere); the seed is a plain module."""
    from torch.distributed.device_mesh import init_device_mesh

    net = Net()
    _tensor_parallel(net.host, init_device_mesh("cpu", (world,)))
    return _measure("tp", endpoint, net, batch(0))


def fsdp2_tp(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """FSDP2 over dp and tensor parallel over tp on a (dp=2, tp=2) mesh.

    The TP weights become 2-D DTensors; the LayerNorm and the seed are sharded over the dp
    sub-mesh only (1-D DTensors), replicated over tp without saying so.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    net = Net()
    _tensor_parallel(net.host, mesh["tp"])
    fully_shard(net.host, mesh=mesh["dp"])
    fully_shard(net, mesh=mesh["dp"])
    return _measure("fsdp2_tp", endpoint, net, batch(mesh.get_coordinate()[0]))


def partial(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """A group whose gradient is a ``Partial`` DTensor (not reduced yet), next to plain groups.

    Captures twice with the Partial gradient, then once more after reducing it.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    import esper_telemetry as et

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    host, q = nn.Linear(8, 8), nn.Linear(8, 3)
    w = nn.Parameter(distribute_tensor(torch.randn(5, 4), mesh, [Replicate()]))
    local = torch.randn(5, 4, generator=torch.Generator().manual_seed(7 + rank))
    w.grad = DTensor.from_local(local, mesh, [Partial()])
    x = batch(0)
    h = host(x)
    (h.pow(2).mean() + q(h.detach()).pow(2).mean()).backward()
    tel = et.attach(host=host, seeds={"p": [w], "q": q}, endpoint=endpoint, run="partial")
    reports = []
    for step in range(3):
        if step == 2:
            w.grad = w.grad.redistribute(mesh, [Replicate()])  # reduced: a gradient now
        tel.capture(step=step)
        assert tel.flush(10.0)
        refs = {
            "host": full_sq(list(host.parameters())),
            "q": full_sq(list(q.parameters())),
            "p": float(w.grad.full_tensor().double().pow(2).sum()),
        }
        report = _groups(tel.latest(), refs)
        report["errors"] = tel.stats()["errors"]
        reports.append(report)
    tel.close()
    return {"captures": reports}


def forced(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """``sharded=True`` over plain tensors (each rank's own), ``sharded=False`` over a DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import esper_telemetry as et

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(2)
    mine = nn.Linear(8, 3)
    mine(batch(rank)).pow(2).mean().backward()  # no reduction: this rank's own gradient
    w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    w.grad = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
    local = {
        "mine": sum(float(p.grad.double().pow(2).sum()) for p in mine.parameters()),
        "w": float(w.grad.to_local().double().pow(2).sum()),
    }
    report = {}
    for run, sharded, groups in (
        ("forced_on", True, {"mine": mine}),
        ("forced_off", False, {"w": [w]}),
    ):
        tel = et.attach(groups=groups, sharded=sharded, endpoint=endpoint, run=run)
        tel.capture(step=0)
        assert tel.flush(10.0)
        report[run] = _groups(tel.latest(), {n: local[n] for n in groups})
        tel.close()
    return report


LAYOUTS: dict[str, Callable[[int, int, str], dict[str, Any]]] = {
    "fsdp2": fsdp2,
    "hsdp": hsdp,
    "tp": tp,
    "fsdp2_tp": fsdp2_tp,
    "partial": partial,
    "forced": forced,
}


def main(
    argv: Sequence[str], layouts: dict[str, Callable[[int, int, str], dict[str, Any]]] | None = None
) -> None:
    """A rank process: ``argv`` is rank, world, port, endpoint and the layouts' names."""
    import torch.distributed as dist

    layouts = LAYOUTS if layouts is None else layouts
    rank, world, port, endpoint, names = int(argv[0]), int(argv[1]), argv[2], argv[3], argv[4]
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s %(message)s")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        report = {name: layouts[name](rank, world, endpoint) for name in names.split(",")}
    finally:
        dist.destroy_process_group()
    assert all(math.isfinite(v) for r in report.values() for v in r.get("ref", {}).values())
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
