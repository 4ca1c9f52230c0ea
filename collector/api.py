"""``attach``: validate the user's groups and settings, then start a ``Telemetry``."""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict, Iterable, Optional, Union

import torch

from esper_telemetry import defaults

from .groups import build_specs
from .telemetry import Telemetry

__all__ = ["attach"]


def attach(
    model: Optional[torch.nn.Module] = None,
    host: Any = None,
    seeds: Optional[Dict[str, Any]] = None,
    groups: Optional[Dict[str, Any]] = None,
    run: Optional[str] = None,
    endpoint: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    sharded: Optional[bool] = None,
    isolated: Iterable[str] = (),
    shared_device: Union[str, torch.device] = "cpu",
    optimizer: Optional[torch.optim.Optimizer] = None,
    every: int = 1,
    scaler: Any = None,
    isolation_threshold: float = 1e-8,
    cuda_graphs: bool = True,
    pointer_tables: bool = True,
    heartbeat_s: float = 5.0,
    queue_size: int = 4096,
    close_timeout_s: float = 2.0,
) -> Telemetry:
    """Watch the gradients of a host, its seeds and any further named parameter groups.

    Each group is a module, an iterable of parameters, a callable returning either, or a
    dotted path under ``model``; groups are re-resolved from the live model at capture, so
    ``model.to(device)`` and replaced submodules are followed. ``isolated`` names groups
    that must receive no gradient (norm above ``isolation_threshold`` is a violation).
    ``shared_device`` is where per-device partial sums meet: ``"cpu"`` (pinned host
    memory, the default) is the only one supported so far. With ``optimizer``, captures
    happen in its step pre-hook every ``every`` steps and the fence in its post-hook; with
    ``scaler`` (a GradScaler) steps it skips are captured and marked ``skipped``.
    ``pointer_tables`` computes CUDA norms with a Triton kernel that reads the gradients'
    addresses from a table (when Triton is installed), and ``cuda_graphs`` replays the pass
    as a CUDA graph; turn either off to fall back to ``torch._foreach_norm``. Raises ``ValueError``/``TypeError`` at once on misuse; never afterwards.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    device = torch.device(shared_device)
    if device.type != "cpu":
        raise ValueError(f"shared_device={shared_device!r}: only 'cpu' (pinned host memory) is supported")
    specs = build_specs(model, host, seeds, groups, isolated)
    dist_rank, dist_world = _distributed()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    if rank < 0 or world_size < 1 or rank >= world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    run = _run_id(run)
    if len(run) > defaults.MAX_STRING_CHARS:
        raise ValueError(f"run id of {len(run)} characters; the wire carries at most {defaults.MAX_STRING_CHARS}")
    return Telemetry(
        specs,
        run=run,
        endpoint=defaults.env_str(defaults.ENV_ENDPOINT, defaults.DEFAULT_ENDPOINT, endpoint),
        rank=rank, world_size=world_size, sharded=sharded, shared_device=device,
        optimizer=optimizer, every=every, scaler=scaler,
        isolation_threshold=isolation_threshold, cuda_graphs=cuda_graphs, pointer_tables=pointer_tables,
        heartbeat_s=heartbeat_s, queue_size=queue_size, close_timeout_s=close_timeout_s,
    )


def _distributed() -> tuple:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _run_id(run: Optional[str]) -> str:
    """Explicit, else ESPER_RUN, else the launcher's job id (same on every rank), else random."""
    if run:
        return run
    for name in (defaults.ENV_RUN, "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            return value
    return f"run-{uuid.uuid4().hex[:12]}"
