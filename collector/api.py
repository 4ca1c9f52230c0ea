"""``attach``: validate the user's groups and settings, then start a ``Telemetry``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .groups import build_specs, structural_names
from .options import make_options
from .telemetry import Telemetry

__all__ = ["attach"]


def attach(
    model: torch.nn.Module | None = None,
    host: Any = None,
    seeds: dict[str, Any] | None = None,
    groups: dict[str, Any] | None = None,
    run: str | None = None,
    endpoint: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    sharded: bool | None = None,
    isolated: Iterable[str] = (),
    shared_device: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    every: int = 1,
    scaler: Any = None,
    isolation_threshold: float = 1e-8,
    structural: bool | Iterable[str] = (),
    cuda_graphs: bool = True,
    pointer_tables: bool = True,
    heartbeat_s: float = 5.0,
    queue_size: int = 4096,
    close_timeout_s: float = 2.0,
    clip_threshold: float | None = None,
    server_public_key_file: str | None = None,
    client_secret_key_file: str | None = None,
) -> Telemetry:
    """Watch the gradients of a host, its seeds and any further named parameter groups.

    Each group is a module, an iterable of parameters, a callable returning either, or a
    dotted path under ``model``; groups are re-resolved from the live model at capture, so
    ``model.to(device)`` and replaced submodules are followed. ``isolated`` names groups
    that must receive no gradient (norm above ``isolation_threshold`` is a violation).
    ``structural`` names groups (``True``: every seed) trained on detached features: a
    forward input of theirs that requires grad is reported as a structural violation at
    every capture while it lasts. Off by default (adapters and jointly trained heads
    normally see inputs that require grad).
    ``shared_device`` is where per-device partial sums meet: ``"cpu"`` (pinned host
    memory, the default) is the only one supported so far. With ``optimizer``, captures
    happen in its step pre-hook every ``every`` steps and the fence in its post-hook; with
    ``scaler`` (a GradScaler) steps it skips are captured and marked ``skipped``.
    ``pointer_tables`` computes CUDA norms with a Triton kernel that reads the gradients'
    addresses from a table (when Triton is installed), and ``cuda_graphs`` replays the pass
    as a CUDA graph; turn either off to fall back to ``torch._foreach_norm``.

    ``server_public_key_file`` (the daemon's ``.key`` certificate) and
    ``client_secret_key_file`` (this collector's ``.key_secret``; ``esper-telemetry keygen``
    writes both kinds) turn on CURVE: encrypted, and admitted only by a daemon that knows
    this collector's public key. Also ``ESPER_TELEMETRY_SERVER_PUBLIC_KEY_FILE`` and
    ``ESPER_TELEMETRY_CLIENT_SECRET_KEY_FILE``. A collector the daemon refuses never
    blocks training: its events are dropped and counted, as with no daemon.

    Not given, the run's name ``run`` is ``ESPER_RUN``, else the launcher's job id (the same
    on every rank), else a random one; the daemon's ``endpoint`` is ``ESPER_TELEMETRY_ENDPOINT``,
    else ``esper_telemetry.defaults.DEFAULT_ENDPOINT``. ``rank`` and ``world_size`` default
    to ``torch.distributed``'s (0 and 1 without it). ``sharded=None`` reads each group's
    layout from its parameters (DTensors); ``True``/``False`` forces it. A heartbeat goes
    every ``heartbeat_s`` seconds; at most ``queue_size`` events wait for the socket (more
    are dropped and counted); ``close_timeout_s`` bounds a ``close()`` given no timeout.
    ``clip_threshold`` is the job's gradient clipping threshold (``max_norm`` of its
    ``clip_grad_norm_``; the trainer callbacks take it from the trainer): it travels to the
    daemon, which counts the captures whose model norm exceeded it. It changes nothing here.

    Raises ``TypeError``/``ValueError`` naming the argument on misuse, before any thread,
    socket or hook exists; never afterwards (see ``esper_telemetry.collector.options``).
    """
    # This signature declares every setting (name, type, default): the arguments go on by
    # name, each to the ``Options`` field of the same name. Taken first: no other local yet.
    arguments = dict(locals())
    specs = build_specs(model, host, seeds, groups, isolated)
    arguments["structural"] = structural_names(structural, specs)
    return Telemetry(specs, make_options(arguments))
