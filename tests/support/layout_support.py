"""Layouts no DTensor describes, built as users build them, on the CPU (gloo): rank side.

The parent (``mesh_support.run_ranks(..., script="layout_support.py")``) starts the ranks;
each named layout here trains a small model for a few steps under a real parallelism API,
captures every step to the endpoint (a real daemon in the tests), and reports the last
step's in-process values (``latest()``) next to the float64 reference of the FULL gradient,
computed from an unsplit copy of the model on the same data in float64:

- ``pp_gpipe``, ``pp_1f1b``: ``torch.distributed.pipelining``, two stages (GPipe, 1F1B); the
  host spans both stages (layers 0-1 on stage 0, layers 2-3 and the head on stage 1), a seed
  on stage 0 trained on detached features;
- ``pp_dp`` (four ranks): the same two stages times two data-parallel replicas, each stage's
  gradients all-reduced over its replicas by hand, as frameworks do;
- ``ep``: experts as plain modules split over two ranks (rank 0 holds experts 0-1, rank 1
  experts 2-3), the router and the input projection replicated (their gradients all-reduced),
  each a group; ``ep_whole``: the same attached with ``model=`` only (the host everything);
- ``ddp``, ``ddp_claim``: DDP; the second says ``sharded=False`` (each rank's value is the
  group's), which the daemon checks;
- ``ddp_adapters``: DDP around an adapter per rank (``adapters.{rank}``): reduced together,
  named apart: the ranks contradict each other;
- ``ddp_left_out``: DDP with the head left out of the all-reduce (same names and shapes,
  other values on each rank);
- ``ddp_tp``, ``ddp_tp_path`` (four ranks): ``DistributedDataParallel(model,
  device_mesh=mesh["dp"])`` around ``parallelize_module`` on a (dp=2, tp=2) mesh; the host
  given as its parameters, which DDP made local shards carrying ``_st_info``, or as the
  model's (``model=``, the host everything but the seed), whose TP weights are no longer
  registered after the first forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from mesh_support import Net, main
from torch import nn

STEPS = 2
MICROBATCHES = 2


def data(step: int, replica: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * replica + 1)
    return torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def sq64(params: Sequence[torch.Tensor]) -> float:
    return sum(float(p.grad.detach().double().pow(2).sum()) for p in params if p.grad is not None)


def count(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def measured(tel: Any, refs: dict[str, tuple[float, int]]) -> dict[str, Any]:
    """The last capture as ``latest()`` gives it, next to the references (sq, params)."""
    assert tel.flush(20.0)
    res = tel.latest()
    report = {
        "sq": {n: g.sq for n, g in res.groups.items()},
        "local": {n: g.local for n, g in res.groups.items()},
        "params": {n: g.params for n, g in res.groups.items()},
        "ratios": res.ratios,
        "step": res.step,
        "ref": {n: sq for n, (sq, _) in refs.items()},
        "ref_params": {n: p for n, (_, p) in refs.items()},
        "errors": tel.stats()["errors"],
    }
    tel.close()
    return report


# -- pipeline parallel -------------------------------------------------------------------


class Stack(nn.Module):
    """Four layers and a head (the host), a seed on the detached features after layer 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank and in the reference
        self.layers = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(4)})
        self.seed: nn.Module | None = nn.Linear(8, 8)
        self.head: nn.Module | None = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for key, layer in self.layers.items():
            x = torch.tanh(layer(x))
            if key == "1" and self.seed is not None:
                x = x + 0.5 * self.seed(x.detach())
        return x if self.head is None else self.head(x)


def stage_module(stage: int) -> Stack:
    """Stage 0: layers 0-1 and the seed; stage 1: layers 2-3 and the head (built whole, the
    other stage's parts deleted, as torchtitan does: names stay those of the whole model)."""
    net = Stack()
    if stage == 0:
        del net.layers["2"], net.layers["3"]
        net.head = None
    else:
        del net.layers["0"], net.layers["1"]
        net.seed = None
    return net


def stack_refs(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The whole model's float64 gradient over ``batches`` (data-parallel replicas, averaged),
    each split in microbatches whose losses the schedule averages."""
    full = Stack().double()
    for x, y in batches:
        for xm, ym in zip(x.chunk(MICROBATCHES), y.chunk(MICROBATCHES)):
            (mse(full(xm.double()), ym.double()) / (MICROBATCHES * len(batches))).backward()
    host = [*full.layers.parameters(), *full.head.parameters()]
    seed = list(full.seed.parameters())
    return {"host": (sq64(host), count(host)), "s": (sq64(seed), count(seed))}


def _pipeline(
    run: str, endpoint: str, schedule: str, stage: int, replica: int | None, pp: Any, dp: Any
) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    import esper_telemetry as et

    net = stage_module(stage)
    pipe = PipelineStage(net, stage, 2, torch.device("cpu"), group=pp)
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = kind(pipe, n_microbatches=MICROBATCHES, loss_fn=mse)
    # Every rank attaches the same way; the seed exists on stage 0 only.
    seeds = {"s": "seed"} if stage == 0 else None
    tel = et.attach(model=net, seeds=seeds, endpoint=endpoint, run=run)
    replicas = [0] if replica is None else [0, 1]
    for step in range(STEPS):
        for p in net.parameters():
            p.grad = None
        x, y = data(step, replica or 0)
        if stage == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        if dp is not None:  # each stage's replicas all-reduce its gradients
            for p in net.parameters():
                dist.all_reduce(p.grad, group=dp)
                p.grad /= 2
        tel.capture(step=step)
    return measured(tel, stack_refs([data(STEPS - 1, r) for r in replicas]))


def pp_gpipe(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    return _pipeline("pp_gpipe", endpoint, "gpipe", rank, None, None, None)


def pp_1f1b(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    return _pipeline("pp_1f1b", endpoint, "1f1b", rank, None, None, None)


def pp_dp(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """Two stages times two data-parallel replicas: ranks (0, 1) stage 0, (2, 3) stage 1."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage, replica = mesh.get_coordinate()
    pp, dp = mesh["pp"].get_group(), mesh["dp"].get_group()
    return _pipeline("pp_dp", endpoint, "1f1b", stage, replica, pp, dp)


# -- expert parallel ---------------------------------------------------------------------


class MoE(nn.Module):
    """An input projection, a top-1 router over four experts; this rank's experts only
    (``ranks`` of them in all: rank r holds experts 2r and 2r+1)."""

    def __init__(self, rank: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.router = nn.Linear(8, 4)
        experts = {str(e): nn.Linear(8, 8) for e in range(4)}
        self.experts = nn.ModuleDict(
            {k: v for k, v in experts.items() if rank is None or int(k) // 2 == rank}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        gates = torch.softmax(self.router(h), dim=-1)
        top = gates.argmax(dim=-1)
        out = torch.zeros_like(h)
        for key, expert in self.experts.items():
            e = int(key)
            chosen = (top == e).unsqueeze(-1).to(h.dtype)
            out = out + chosen * gates[:, e : e + 1] * expert(h)
        return out


def ep(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    return _ep("ep", rank, world, endpoint, {"experts": "experts", "router": "router"})


def ep_whole(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    """The same job attached as most are: ``model=``, the host everything. Each rank's host
    holds the router and the projection (the same on every rank) and its own experts."""
    return _ep("ep_whole", rank, world, endpoint, None)


def _ep(
    run: str, rank: int, world: int, endpoint: str, groups: dict[str, str] | None
) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    import esper_telemetry as et

    moe = MoE(rank)
    tel = et.attach(model=moe, groups=groups, endpoint=endpoint, run=run)
    for step in range(STEPS):
        for p in moe.parameters():
            p.grad = None
        x, y = data(step, n=32)
        # Each rank adds its experts' outputs; the sum is the layer's (a differentiable
        # all-reduce). Every rank computes the same loss, so each takes 1/world of it.
        out = all_reduce(moe(x))
        (mse(out.sum(-1, keepdim=True), y) / world).backward()
        for p in [*moe.proj.parameters(), *moe.router.parameters()]:  # replicated: reduced
            dist.all_reduce(p.grad)
        tel.capture(step=step)
    full = MoE(None).double()
    x, y = data(STEPS - 1, n=32)
    mse(full(x.double()).sum(-1, keepdim=True), y.double()).backward()
    parts = (("host", full.proj), ("router", full.router), ("experts", full.experts))
    if groups is None:
        parts = (("host", full),)
    refs = {name: (sq64(list(m.parameters())), count(list(m.parameters()))) for name, m in parts}
    report = measured(tel, refs)
    # Every expert received tokens: none of the parts is zero by accident.
    report["experts_local_sq"] = sq64(list(moe.experts.parameters()))
    return report


# -- DDP ---------------------------------------------------------------------------------


def _ddp_refs(batches: Sequence[torch.Tensor]) -> dict[str, tuple[float, int]]:
    full = Net().double()
    for x in batches:
        (full(x.double()) / len(batches)).backward()
    host, seed = list(full.host.parameters()), list(full.seed.parameters())
    return {"host": (sq64(host), count(host)), "s": (sq64(seed), count(seed))}


def _ddp(run: str, rank: int, world: int, endpoint: str, **attach: Any) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import esper_telemetry as et

    net = Net()
    ddp = DDP(net)
    tel = et.attach(
        model=net, host="host", seeds={"s": "seed"}, endpoint=endpoint, run=run, **attach
    )
    for step in range(STEPS):
        net.zero_grad(set_to_none=True)
        ddp(data(step, rank)[0]).backward()
        tel.capture(step=step)
    return measured(tel, _ddp_refs([data(STEPS - 1, r)[0] for r in range(world)]))


def ddp(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    return _ddp("ddp", rank, world, endpoint)


def ddp_claim(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    return _ddp("ddp_claim", rank, world, endpoint, sharded=False)


class Adapted(nn.Module):
    """A base and a head; one adapter per rank, named by it (``adapters.{rank}``)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.adapters = nn.ModuleDict({str(rank): nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.base(x))
        for adapter in self.adapters.values():
            h = h + adapter(x)
        return self.head(h)


def ddp_adapters(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import esper_telemetry as et

    net = Adapted(rank)
    wrapped = DDP(net)  # same shapes in the same places: DDP reduces the adapters together
    tel = et.attach(model=net, seeds={"adapter": "adapters"}, endpoint=endpoint, run="ddp_adapters")
    for step in range(STEPS):
        net.zero_grad(set_to_none=True)
        x, y = data(step, rank)
        mse(wrapped(x), y).backward()
        tel.capture(step=step)
    return measured(tel, {})


def ddp_left_out(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import esper_telemetry as et

    net = Adapted(0)
    DDP._set_params_and_buffers_to_ignore_for_model(net, ["head.weight", "head.bias"])
    wrapped = DDP(net)
    tel = et.attach(model=net, groups={"head": "head"}, endpoint=endpoint, run="ddp_left_out")
    for step in range(STEPS):
        net.zero_grad(set_to_none=True)
        x, y = data(step, rank)
        mse(wrapped(x), y).backward()
        tel.capture(step=step)
    # The host (base and adapter) is all-reduced: its reference is the replicas' average.
    full = Adapted(0).double()
    for r in range(world):
        x, y = data(STEPS - 1, r)
        (mse(full(x.double()), y.double()) / world).backward()
    host = [*full.base.parameters(), *full.adapters.parameters()]
    return measured(tel, {"host": (sq64(host), count(host))})


# -- DDP around tensor parallel ----------------------------------------------------------


def ddp_tp(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    return _ddp_tp("ddp_tp", endpoint, by_path=False)


def ddp_tp_path(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    return _ddp_tp("ddp_tp_path", endpoint, by_path=True)


def _ddp_tp(run: str, endpoint: str, by_path: bool) -> dict[str, Any]:
    """``by_path``: attach as most jobs do, ``model=`` and the host everything but the seed;
    else the host given as the local-shard Parameters DDP made."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    import esper_telemetry as et

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    replica = mesh.get_coordinate()[0]
    net = Net()
    parallelize_module(net.host, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    wrapped = DDP(net, device_mesh=mesh["dp"])
    # DDP made the TP weights local shards carrying their DTensor spec (_st_info); after the
    # first forward they are no longer registered in the module: given as parameters, they
    # are followed.
    shards = [p for p in net.host.parameters()]
    assert any(hasattr(p, "_st_info") for p in shards)
    if by_path:
        tel = et.attach(model=net, seeds={"s": "seed"}, endpoint=endpoint, run=run)
    else:
        tel = et.attach(host=shards, seeds={"s": net.seed}, endpoint=endpoint, run=run)
    for step in range(STEPS):
        for p in [*shards, *net.seed.parameters()]:
            p.grad = None
        wrapped(data(step, replica)[0]).backward()
        tel.capture(step=step)
    return measured(tel, _ddp_refs([data(STEPS - 1, r)[0] for r in range(2)]))


LAYOUTS: dict[str, Callable[[int, int, str], dict[str, Any]]] = {
    "pp_gpipe": pp_gpipe,
    "pp_1f1b": pp_1f1b,
    "pp_dp": pp_dp,
    "ep": ep,
    "ep_whole": ep_whole,
    "ddp": ddp,
    "ddp_claim": ddp_claim,
    "ddp_adapters": ddp_adapters,
    "ddp_left_out": ddp_left_out,
    "ddp_tp": ddp_tp,
    "ddp_tp_path": ddp_tp_path,
}

if __name__ == "__main__":
    main(sys.argv[1:], LAYOUTS)
