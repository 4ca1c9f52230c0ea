"""``Options``: every setting of one ``attach`` call, checked before anything starts.

``attach`` builds one immutable record from its arguments and the ``ESPER_*`` environment;
every check that can refuse happens here, so a refused attach has started no thread,
opened no socket and registered no hook. Errors name the argument (or the variable the
value came from) and what is accepted.

Each setting is declared once, as an argument of ``attach``: its name, type and default are
in that signature (for readers and IDEs), its meaning in that docstring. ``make_options``
takes the arguments by name and each field of ``Options`` is the argument of the same name,
checked and resolved; nothing in between restates them, so a setting added to ``attach``
without a field here (or the reverse) fails every attach, and so every test, at once.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import torch

from esper_telemetry import defaults
from esper_telemetry.endpoints import check_endpoint

from .curve import CurveKeys, load_client_keys

__all__ = ["Options", "make_options"]


class Options(NamedTuple):
    """Validated settings of one collector: ``attach``'s arguments of the same names, resolved.

    Times in seconds, sizes in events. What each means, and its default, is ``attach``'s.
    """

    run: str  # never None: from the environment when not given, else made up
    endpoint: str  # never None: from the environment when not given, else the default
    rank: int  # never None: from torch.distributed when not given
    world_size: int
    sharded: bool | None  # None: from the parameters' placements
    shared_device: torch.device
    optimizer: Any  # a torch.optim.Optimizer, or None
    every: int
    scaler: Any  # a GradScaler, or None
    isolation_threshold: float
    structural: tuple[str, ...]  # names of the groups watched (``True`` resolved)
    cuda_graphs: bool
    pointer_tables: bool
    heartbeat_s: float
    queue_size: int
    close_timeout_s: float
    clip_threshold: float | None  # the job's gradient clipping threshold, for the daemon
    server_public_key_file: str | None  # the argument, else its ESPER_ variable; None: unset
    client_secret_key_file: str | None
    curve: CurveKeys | None  # the only field no argument names: read from the two files


# attach's arguments that make the groups (``groups.build_specs``), not settings.
GROUP_ARGUMENTS = frozenset({"model", "host", "seeds", "groups", "isolated"})


def make_options(arguments: Mapping[str, Any]) -> Options:
    """Check and resolve ``attach``'s ``arguments`` (by name; ``structural`` already names).

    Every argument but the groups' becomes the ``Options`` field of its name: first each one
    on its own (``_CHECKS``, in order), then what depends on others or on the environment.
    ``TypeError``/``ValueError`` name the argument.
    """
    given = {name: value for name, value in arguments.items() if name not in GROUP_ARGUMENTS}
    for name, check in _CHECKS.items():
        given[name] = check(name, given[name])
    scaler = given["scaler"]
    if scaler is not None:
        if given["optimizer"] is None:
            raise ValueError("scaler= needs optimizer=: skipped steps are found by watching both")
        if not callable(getattr(scaler, "update", None)):
            raise TypeError(f"scaler= takes a torch.amp.GradScaler, got {type(scaler).__name__}")

    endpoint, source = defaults.lookup(
        defaults.ENV_ENDPOINT, defaults.DEFAULT_ENDPOINT, given["endpoint"]
    )
    where = defaults.ENV_ENDPOINT if source == "environment" else "endpoint="
    try:
        check_endpoint(endpoint, bind=False, inproc=True)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where} {exc}") from None
    given["endpoint"] = endpoint

    server, client, curve = _curve_keys(
        given["server_public_key_file"], given["client_secret_key_file"]
    )
    given.update(server_public_key_file=server, client_secret_key_file=client)

    dist_rank, dist_world = _distributed()
    rank = dist_rank if given["rank"] is None else given["rank"]
    world_size = dist_world if given["world_size"] is None else given["world_size"]
    _integer("rank", rank, minimum=0)
    _integer("world_size", world_size, minimum=1)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    given.update(rank=rank, world_size=world_size)

    run = _run_id(given["run"])
    if len(run) > defaults.MAX_STRING_CHARS:
        raise ValueError(
            f"run id of {len(run)} characters; the wire carries at most {defaults.MAX_STRING_CHARS}"
        )
    given["run"] = run
    return Options(**given, curve=curve)


def _curve_keys(
    server_public: str | None, client_secret: str | None
) -> tuple[str | None, str | None, CurveKeys | None]:
    """Both key files (argument, else variable), read now: an unreadable one fails attach.

    Returns the two paths found (None: not set) and the keys (None: plain ZeroMQ).
    """
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
        return paths[0][0], paths[1][0], load_client_keys(paths[0][0], paths[1][0])
    except ValueError as exc:
        named = [
            where for (path, where) in paths if path is not None and where.startswith("ESPER_")
        ]
        raise ValueError(f"{exc}" + (f" (from {', '.join(named)})" if named else "")) from None


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}= takes an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _number(name: str, value: Any, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}= takes a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}"
        )
    return float(value)


def _tristate(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name}= takes True, False or None, got {value!r}")
    return value


def _device(name: str, value: Any) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}={value!r} is not a device: {exc}") from None
    if device.type != "cpu":
        raise ValueError(f"{name}={value!r}: only 'cpu' (pinned host memory) is supported")
    return device


def _optimizer(name: str, value: Any) -> Any:
    hooks = ("register_step_pre_hook", "register_step_post_hook")
    if value is not None and not all(callable(getattr(value, hook, None)) for hook in hooks):
        raise TypeError(f"{name}= takes a torch.optim.Optimizer, got {type(value).__name__}")
    return value


# The settings checked on their own, in this order: name -> check(name, value) -> value kept.
# The rest (scaler, endpoint, key files, rank, world size, run) depend on another argument or
# on the environment: ``make_options`` checks them after these.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "every": partial(_integer, minimum=1),
    "queue_size": partial(_integer, minimum=1),
    "heartbeat_s": partial(_number, positive=True),
    "close_timeout_s": partial(_number, positive=False),
    "isolation_threshold": partial(_number, positive=False),
    "clip_threshold": lambda name, value: None if value is None else _number(name, value, True),
    "sharded": _tristate,
    "shared_device": _device,
    "optimizer": _optimizer,
    "structural": lambda name, value: tuple(value),
    "cuda_graphs": lambda name, value: bool(value),
    "pointer_tables": lambda name, value: bool(value),
}


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
