"""Megatron-core tensor parallelism on the CPU (gloo), built as its users build it: rank side.

The parent (``mesh_support.run_ranks(..., script="megatron_support.py")``) starts the ranks;
each layout makes Megatron-core's groups (``parallel_state.initialize_model_parallel``),
trains a few steps, captures every step to the endpoint (a real daemon in the tests) and
reports ``latest()`` next to the float64 reference of the FULL gradient (an unsplit float64
copy on every data-parallel replica's batch, averaged):

- ``megatron_tp_dp`` (four ranks): tensor parallel 2 x data parallel 2: a host of a
  LayerNorm, a ``ColumnParallelLinear`` and a ``RowParallelLinear`` (plain Parameters
  marked ``tensor_model_parallel``; the LayerNorm and the row layer's bias the same on
  both tensor-parallel ranks), a seed on its detached output (the same on every rank);
  each gradient all-reduced over its data-parallel group by hand, as Megatron's own DDP
  does (it needs CUDA).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from layout_support import STEPS, count, data, measured, sq64
from mesh_support import main
from torch import nn

HIDDEN = 16


class Full(nn.Module):
    """The model unsplit: the reference, and the source of every rank's part."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, HIDDEN)
        self.down = nn.Linear(HIDDEN, 8)
        self.seed = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.up(self.norm(x))))
        return h.pow(2).mean() + self.seed(h.detach()).pow(2).mean() * 3.0


class Host(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.norm = nn.LayerNorm(8)
        self.up = ColumnParallelLinear(
            8, HIDDEN, config=config, init_method=nn.init.zeros_, bias=True, gather_output=False
        )
        self.down = RowParallelLinear(
            HIDDEN,
            8,
            config=config,
            init_method=nn.init.zeros_,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.up(self.norm(x))
        out, _ = self.down(torch.relu(h))
        return out


class Split(nn.Module):
    """``Full`` with its host split over the tensor-parallel group."""

    def __init__(self, config: Any, rank: int, size: int) -> None:
        super().__init__()
        self.host = Host(config)
        self.seed = nn.Linear(8, 3)
        full, part = Full(), slice(rank * HIDDEN // size, (rank + 1) * HIDDEN // size)
        with torch.no_grad():
            self.host.norm.load_state_dict(full.norm.state_dict())
            self.seed.load_state_dict(full.seed.state_dict())
            self.host.up.weight.copy_(full.up.weight[part])
            self.host.up.bias.copy_(full.up.bias[part])
            self.host.down.weight.copy_(full.down.weight[:, part])
            self.host.down.bias.copy_(full.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        return h.pow(2).mean() + self.seed(h.detach()).pow(2).mean() * 3.0


def _megatron(run: str, endpoint: str, tp: int) -> dict[str, Any]:
    import torch.distributed as dist

    with warnings.catch_warnings():  # no Transformer Engine or Apex here: said at import
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig

    import esper_telemetry as et

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        replica = parallel_state.get_data_parallel_rank()
        dp_group = parallel_state.get_data_parallel_group()
        replicas = dist.get_world_size(dp_group)
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
        net = Split(config, rank, tp)
        marked = [n for n, p in net.named_parameters() if getattr(p, "tensor_model_parallel", 0)]
        assert marked == ["host.up.weight", "host.up.bias", "host.down.weight"], marked
        tel = et.attach(model=net, host="host", seeds={"s": "seed"}, endpoint=endpoint, run=run)
        for step in range(STEPS):
            net.zero_grad(set_to_none=True)
            net(data(step, replica)[0]).backward()
            for p in net.parameters():
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= replicas
            tel.capture(step=step)
        full = Full().double()
        for r in range(replicas):
            (full(data(STEPS - 1, r)[0].double()) / replicas).backward()
        host = [*full.norm.parameters(), *full.up.parameters(), *full.down.parameters()]
        seed = list(full.seed.parameters())
        report = measured(tel, {"host": (sq64(host), count(host)), "s": (sq64(seed), count(seed))})
        report["tp_rank"] = rank
        return report
    finally:
        parallel_state.destroy_model_parallel()


LAYOUTS = {
    "megatron_tp_dp": lambda r, w, e: _megatron("megatron_tp_dp", e, tp=2),
}

if __name__ == "__main__":
    main(sys.argv[1:], LAYOUTS)
