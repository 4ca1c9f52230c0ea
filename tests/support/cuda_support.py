"""Helpers for the collector's CUDA tests (tests/collector/test_cuda*.py): a host+seeds model,
float64 references computed on the CPU, sync-debug mode, and a training stream kept busy.

Importable without CUDA (the test modules skip themselves then); nothing here touches the
device at import time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import pytest
import torch

import esper_telemetry as et

GRAPH_MODES = [pytest.param(True, id="graphs"), pytest.param(False, id="eager")]
KERNELS = [pytest.param(True, id="tables"), pytest.param(False, id="foreach")]
# The four passes: pointer tables (Triton) or _foreach_norm, each graphed or eager. The
# sanitizer run (tools/gpu-check.sh) selects "eager and foreach": it cannot see the reads of
# a graph replay or of the Triton kernel, which takes raw addresses from a table.
PASSES = [
    pytest.param(True, True, id="graphs-tables"),
    pytest.param(True, False, id="graphs-foreach"),
    pytest.param(False, True, id="eager-tables"),
    pytest.param(False, False, id="eager-foreach"),
]


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Any host-device synchronization inside raises (and the collector would count it)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (the whole tensor on a world of one); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def ref_sq(params: Iterable[torch.Tensor]) -> float:
    """Float64 sum of squares of the present gradients, on the CPU."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += local(p.grad).detach().to("cpu", torch.float64).pow(2).sum().item()
    return total


def assert_close(got: float | None, want: float, rel: float) -> None:
    assert got is not None
    assert math.isclose(got, want, rel_tol=rel, abs_tol=1e-30), (got, want)


class HostSeeds(torch.nn.Module):
    def __init__(self, width: int = 64, dtype=torch.float32) -> None:
        super().__init__()
        self.host = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width)
        ).to(dtype)
        self.seeds = torch.nn.ModuleDict(
            {
                "a": torch.nn.Linear(width, width).to(dtype),
                "b": torch.nn.Linear(width, width).to(dtype),
            }
        )

    def forward(self, x):
        h = self.host[1](self.host[0](x))
        y = self.host[2](h)
        for seed in self.seeds.values():
            y = y + seed(h.detach())  # isolation: the seeds train on detached features
        return y


def attach_host_seeds(model: HostSeeds, endpoint: str, **kw):
    kw.setdefault("run", "cuda-test")
    return et.attach(
        model=model,
        host=model.host,
        seeds={"a": "seeds.a", "b": "seeds.b"},
        endpoint=endpoint,
        **kw,
    )


def train_step(model, device="cuda", dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Forward and backward on a random batch; returns the (unscaled) loss."""
    x = torch.randn(32, model.host[0].in_features, device=device, dtype=dtype)
    loss = model(x).float().pow(2).mean()
    (loss * scale).backward()
    return loss


_cycles_per_s: list[float] = []


def busy_for(seconds: float) -> torch.cuda.Event:
    """Keep the current stream busy for about ``seconds`` (``torch.cuda._sleep``, calibrated
    once per process); returns an event recorded after it, whose ``query()`` stays False
    while the stream is still busy. Calibration synchronizes: call it outside timed parts."""
    if not _cycles_per_s:
        torch.cuda._sleep(1_000_000)  # the first launch pays for loading the kernel
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        _cycles_per_s.append(20_000_000 / (start.elapsed_time(end) / 1e3))
    torch.cuda._sleep(int(seconds * _cycles_per_s[0]))
    after = torch.cuda.Event()
    after.record()
    return after
