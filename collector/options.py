"""``Options``: every setting of one ``attach`` call, checked before anything starts.

``attach`` builds one immutable record from its arguments and the ``ESPER_*`` environment;
every check that can refuse happens here, so a refused attach has started no thread,
opened no socket and registered no hook. Errors name the argument (or the variable the
value came from) and what is accepted.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any, NamedTuple

import torch

from esper_telemetry import defaults
from esper_telemetry.endpoints import check_endpoint

from .curve import CurveKeys, load_client_keys

__all__ = ["Options", "make_options"]


class Options(NamedTuple):
    """Validated settings of one collector; times in seconds, sizes in events."""

    run: str
    endpoint: str
    rank: int
    world_size: int
    sharded: bool | None  # None: from the parameters' placements
    optimizer: Any  # a torch.optim.Optimizer, or None
    every: int  # optimizer steps per capture
    scaler: Any  # a GradScaler, or None
    isolation_threshold: float
    structural: tuple[str, ...]  # groups whose forward input must not require grad
    cuda_graphs: bool
    pointer_tables: bool
    heartbeat_s: float
    queue_size: int
    close_timeout_s: float
    curve: CurveKeys | None = None  # CURVE keys for the socket; None: plain ZeroMQ


def make_options(
    *,
    run: str | None,
    endpoint: str | None,
    rank: int | None,
    world_size: int | None,
    sharded: bool | None,
    shared_device: str | torch.device,
    optimizer: Any,
    every: int,
    scaler: Any,
    isolation_threshold: float,
    structural: tuple[str, ...],
    cuda_graphs: bool,
    pointer_tables: bool,
    heartbeat_s: float,
    queue_size: int,
    close_timeout_s: float,
    server_public_key_file: str | None = None,
    client_secret_key_file: str | None = None,
) -> Options:
    """Check and normalize ``attach``'s settings; ``TypeError``/``ValueError`` name the argument."""
    _integer("every", every, minimum=1)
    _integer("queue_size", queue_size, minimum=1)
    _number("heartbeat_s", heartbeat_s, positive=True)
    _number("close_timeout_s", close_timeout_s, positive=False)
    _number("isolation_threshold", isolation_threshold, positive=False)
    if sharded is not None and not isinstance(sharded, bool):
        raise TypeError(f"sharded= takes True, False or None, got {sharded!r}")
    try:
        device = torch.device(shared_device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"shared_device={shared_device!r} is not a device: {exc}") from None
    if device.type != "cpu":
        raise ValueError(
            f"shared_device={shared_device!r}: only 'cpu' (pinned host memory) is supported"
        )
    if optimizer is not None and not all(
        callable(getattr(optimizer, hook, None))
        for hook in ("register_step_pre_hook", "register_step_post_hook")
    ):
        raise TypeError(f"optimizer= takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scaler is not None:
        if optimizer is None:
            raise ValueError("scaler= needs optimizer=: skipped steps are found by watching both")
        if not callable(getattr(scaler, "update", None)):
            raise TypeError(f"scaler= takes a torch.amp.GradScaler, got {type(scaler).__name__}")

    endpoint, source = defaults.lookup(defaults.ENV_ENDPOINT, defaults.DEFAULT_ENDPOINT, endpoint)
    where = defaults.ENV_ENDPOINT if source == "environment" else "endpoint="
    try:
        check_endpoint(endpoint, bind=False, inproc=True)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where} {exc}") from None

    curve = _curve_keys(server_public_key_file, client_secret_key_file)

    dist_rank, dist_world = _distributed()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    _integer("rank", rank, minimum=0)
    _integer("world_size", world_size, minimum=1)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    run = _run_id(run)
    if len(run) > defaults.MAX_STRING_CHARS:
        raise ValueError(
            f"run id of {len(run)} characters; the wire carries at most {defaults.MAX_STRING_CHARS}"
        )
    return Options(
        run,
        endpoint,
        rank,
        world_size,
        sharded,
        optimizer,
        every,
        scaler,
        float(isolation_threshold),
        tuple(structural),
        bool(cuda_graphs),
        bool(pointer_tables),
        float(heartbeat_s),
        queue_size,
        float(close_timeout_s),
        curve,
    )


def _curve_keys(server_public: str | None, client_secret: str | None) -> CurveKeys | None:
    """Both key files (argument, else variable), read now: an unreadable one fails attach."""
    paths = []
    for argument, env, value in (
        ("server_public_key_file=", defaults.ENV_SERVER_PUBLIC_KEY_FILE, server_public),
        ("client_secret_key_file=", defaults.ENV_CLIENT_SECRET_KEY_FILE, client_secret),
    ):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{argument} takes a file path, got {type(value).__name__}")
        found, source = defaults.lookup(env, "", None if value is None else os.fspath(value))
        paths.append((found or None, env if source == "environment" else argument))
    try:
        return load_client_keys(paths[0][0], paths[1][0])
    except ValueError as exc:
        named = [
            where for (path, where) in paths if path is not None and where.startswith("ESPER_")
        ]
        raise ValueError(f"{exc}" + (f" (from {', '.join(named)})" if named else "")) from None


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}= takes an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _number(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}= takes a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}"
        )


def _distributed() -> tuple:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _run_id(run: str | None) -> str:
    """Explicit, else ESPER_RUN, else the launcher's job id (same on every rank), else random."""
    if run is not None and not isinstance(run, str):
        raise TypeError(f"run= takes a string, got {type(run).__name__}")
    if run:
        return run
    for name in (defaults.ENV_RUN, "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            return value
    return f"run-{uuid.uuid4().hex[:12]}"
