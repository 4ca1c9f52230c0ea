"""FSDP1 (``FullyShardedDataParallel``) on the CPU (gloo), built as users build it: rank side.

The parent (``mesh_support.run_ranks(..., script="fsdp1_support.py")``) starts the ranks;
each layout trains a few steps, captures every step to the endpoint (a real daemon in the
tests) and reports ``latest()`` next to the float64 reference of the FULL gradient (an
unsharded float64 copy of the model on every rank's batch, averaged as FSDP averages):

- ``fsdp1_orig``, ``fsdp1_flat``: the host and the seed each an FSDP unit inside a root
  unit, ``use_orig_params=True`` and ``False``. The seed's 64 weights split 32 and 32: both
  ranks hold a piece of one name and shape, which only its position tells apart;
- ``fsdp1_before``: attached to the plain model, then wrapped in one root unit
  (``use_orig_params=True``): FSDP1 keeps the Parameter objects and makes each a view of
  the rank's shard, which no registration shows;
- ``fsdp1_flat_before``: the same with ``use_orig_params=False``: the parameters leave their
  modules for a FlatParameter, and the groups cannot be followed;
- ``fsdp1_flat_inside``: ``use_orig_params=False``, one root unit, attached after: a group
  inside the unit holds no parameter of its own (the error ``attach`` raises);
- ``fsdp1_hybrid``, ``fsdp1_flat_hybrid`` (four ranks): ``HYBRID_SHARD`` on a (2, 2) mesh,
  each shard held by two replicas;
- ``fsdp1_orig_four``, ``fsdp1_gpt2_four``: ``fsdp1_orig`` and ``fsdp1_gpt2`` fully sharded
  over four ranks, where two ranks can both hold none of a parameter;
- ``fsdp1_gpt2``, ``fsdp1_gpt2_flat``: GPT-2 from a config (tied embeddings, no dropout),
  wrapped as most FSDP1 jobs wrap it (``transformer_auto_wrap_policy``, one unit per block),
  the second block a seed by its path, the host the rest.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from layout_support import STEPS, count, data, measured, sq64
from mesh_support import Net, main
from torch import nn


class Pair(nn.Module):
    """A host of two 8x8 layers and an 8x8 seed on its detached output, no biases: every
    piece of 64 splits evenly over two ranks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank
        self.host = nn.Sequential(
            nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False)
        )
        self.seed = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        return h.pow(2).mean() + self.seed(h.detach()).pow(2).mean() * 3.0


def _refs(make: type[nn.Module], world: int) -> dict[str, tuple[float, int]]:
    """The float64 gradient of the last step, every rank's batch averaged (as FSDP does)."""
    full = make().double()
    for r in range(world):
        (full(data(STEPS - 1, r)[0].double()) / world).backward()
    host, seed = list(full.host.parameters()), list(full.seed.parameters())
    return {"host": (sq64(host), count(host)), "s": (sq64(seed), count(seed))}


def _wrap(net: nn.Module, orig: bool, units: bool, hybrid: bool = False) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    kw: dict[str, Any] = {"use_orig_params": orig, "device_id": torch.device("cpu")}
    if hybrid:
        from torch.distributed.device_mesh import init_device_mesh

        kw["sharding_strategy"] = ShardingStrategy.HYBRID_SHARD
        kw["device_mesh"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    if units:
        net.host = FSDP(net.host, **kw)
        net.seed = FSDP(net.seed, **kw)
    return FSDP(net, **kw)


def _train(rank: int, model: nn.Module, tel: Any) -> None:
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        model(data(step, rank)[0]).backward()
        tel.capture(step=step)


def _fsdp1(
    run: str, rank: int, world: int, endpoint: str, make: type[nn.Module], **wrap: Any
) -> dict[str, Any]:
    import esper_telemetry as et

    model = _wrap(make(), **wrap)
    tel = et.attach(model=model, host="host", seeds={"s": "seed"}, endpoint=endpoint, run=run)
    _train(rank, model, tel)
    return measured(tel, _refs(make, world))


def _before(run: str, rank: int, world: int, endpoint: str, orig: bool) -> dict[str, Any]:
    import esper_telemetry as et

    net = Net()
    tel = et.attach(model=net, host="host", seeds={"s": "seed"}, endpoint=endpoint, run=run)
    model = _wrap(net, orig=orig, units=False)
    _train(rank, model, tel)
    assert tel.flush(20.0)
    stale = {n: g.stale for n, g in tel.latest().groups.items()}
    return {**measured(tel, _refs(Net, world)), "stale": stale}


def _gpt2(run: str, rank: int, world: int, endpoint: str, orig: bool) -> dict[str, Any]:
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from trainer_support import SEQ, VOCAB, tiny_gpt2
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    import esper_telemetry as et

    def gpt2() -> nn.Module:
        return tiny_gpt2(0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def tokens(step: int, r: int) -> torch.Tensor:
        return torch.randint(
            0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(step + 10 * r)
        )

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={GPT2Block})
    model = FSDP(
        gpt2(), auto_wrap_policy=policy, use_orig_params=orig, device_id=torch.device("cpu")
    )
    tel = et.attach(model=model, seeds={"s": "transformer.h.1"}, endpoint=endpoint, run=run)
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        x = tokens(step, rank)
        model(input_ids=x, labels=x).loss.backward()
        tel.capture(step=step)
    full = gpt2().double()
    for r in range(world):
        x = tokens(STEPS - 1, r)
        (full(input_ids=x, labels=x).loss / world).backward()
    named = dict(full.named_parameters())  # tied: lm_head.weight is transformer.wte.weight
    seed = [p for n, p in named.items() if n.startswith("transformer.h.1.")]
    host = [p for n, p in named.items() if not n.startswith("transformer.h.1.")]
    return measured(tel, {"host": (sq64(host), count(host)), "s": (sq64(seed), count(seed))})


def fsdp1_flat_inside(rank: int, world: int, endpoint: str) -> dict[str, Any]:
    import esper_telemetry as et

    model = _wrap(Net(), orig=False, units=False)
    try:
        et.attach(model=model, host="host", seeds={"s": "seed"}, endpoint=endpoint, run="x")
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


LAYOUTS = {
    "fsdp1_orig": lambda r, w, e: _fsdp1("fsdp1_orig", r, w, e, Pair, orig=True, units=True),
    "fsdp1_flat": lambda r, w, e: _fsdp1("fsdp1_flat", r, w, e, Pair, orig=False, units=True),
    "fsdp1_flat_net": lambda r, w, e: _fsdp1(
        "fsdp1_flat_net", r, w, e, Net, orig=False, units=True
    ),
    "fsdp1_before": lambda r, w, e: _before("fsdp1_before", r, w, e, orig=True),
    "fsdp1_flat_before": lambda r, w, e: _before("fsdp1_flat_before", r, w, e, orig=False),
    "fsdp1_flat_inside": fsdp1_flat_inside,
    "fsdp1_gpt2": lambda r, w, e: _gpt2("fsdp1_gpt2", r, w, e, orig=True),
    "fsdp1_gpt2_flat": lambda r, w, e: _gpt2("fsdp1_gpt2_flat", r, w, e, orig=False),
    "fsdp1_orig_four": lambda r, w, e: _fsdp1(
        "fsdp1_orig_four", r, w, e, Pair, orig=True, units=True
    ),
    "fsdp1_gpt2_four": lambda r, w, e: _gpt2("fsdp1_gpt2_four", r, w, e, orig=True),
    "fsdp1_hybrid": lambda r, w, e: _fsdp1(
        "fsdp1_hybrid", r, w, e, Pair, orig=True, units=True, hybrid=True
    ),
    "fsdp1_flat_hybrid": lambda r, w, e: _fsdp1(
        "fsdp1_flat_hybrid", r, w, e, Pair, orig=False, units=True, hybrid=True
    ),
}

if __name__ == "__main__":
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    main(sys.argv[1:], LAYOUTS)
