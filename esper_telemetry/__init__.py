"""esper-telemetry: gradient health of parameter groups, from the training loop to Prometheus.

This package is the contract between the collector (in the training process) and the
daemon (a service): the event records, their wire codec and the shared defaults. It imports
only the standard library and msgpack, so the daemon never loads torch. ``attach`` is the
training code's entry point; it imports the collector (and torch) only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .codec import REASONS, WireError, decode, encode
from .events import (
    SCHEMA_VERSION,
    DeviceMismatch,
    Event,
    GroupDecl,
    GroupNorm,
    Goodbye,
    Heartbeat,
    Hello,
    IsolationViolation,
    Norms,
)
from .version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from esper_telemetry.collector import Telemetry

__all__ = [
    "__version__",
    "attach",
    "encode",
    "decode",
    "WireError",
    "REASONS",
    "SCHEMA_VERSION",
    "Event",
    "GroupDecl",
    "GroupNorm",
    "Hello",
    "Norms",
    "DeviceMismatch",
    "IsolationViolation",
    "Heartbeat",
    "Goodbye",
]


def attach(*args: Any, **kwargs: Any) -> "Telemetry":
    """Watch parameter groups of a training job and publish their gradient health.

    See ``esper_telemetry.collector.attach`` for the arguments; importing it here lazily keeps torch out of
    processes (the daemon) that only need the wire contract.
    """
    from esper_telemetry.collector import attach as _attach

    return _attach(*args, **kwargs)
