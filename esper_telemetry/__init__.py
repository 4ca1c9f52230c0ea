"""esper-telemetry: gradient health of parameter groups, from the training loop to Prometheus.

``import esper_telemetry as et; et.attach(...)`` is the training code's entry point. The
package face also re-exports the wire contract (event records, the codec), which imports
only the standard library and msgpack, so a daemon never loads torch: ``attach`` (and
``Telemetry``) are looked up on first use, from ``esper_telemetry.collector``, and so is
``peft_groups`` (the PEFT preset), from ``esper_telemetry.integrations.peft``. In an
install without the ``collector`` extra, using them raises an ``ImportError`` that says
what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .codec import REASONS, WireError, decode, encode
from .events import (
    SCHEMA_VERSION,
    DeviceMismatch,
    Event,
    Goodbye,
    GroupDecl,
    GroupNorm,
    Heartbeat,
    Hello,
    IsolationViolation,
    Norms,
)
from .extras import missing_extra
from .version import __version__

if TYPE_CHECKING:  # pragma: no cover - what IDEs and type checkers see
    from .collector.api import attach
    from .collector.telemetry import Telemetry
    from .integrations.peft import peft_groups

__all__ = [
    "__version__",
    "attach",
    "Telemetry",
    "peft_groups",
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

# Names the training side provides, by the module that defines them (all need torch).
_COLLECTOR = {
    "attach": ".collector.api",
    "Telemetry": ".collector.telemetry",
    "peft_groups": ".integrations.peft",
}


def __getattr__(name: str) -> Any:
    """The collector's names, imported on first use (PEP 562): the real objects, not wrappers."""
    where = _COLLECTOR.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(where, __name__)
    except ImportError as exc:
        hint = missing_extra(exc, "collector", f"esper_telemetry.{name}")
        if hint is None:
            raise
        raise hint from exc
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_COLLECTOR))
