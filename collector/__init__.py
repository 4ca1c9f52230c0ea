"""The in-process collector: squared gradient norms per parameter group, published over ZeroMQ.

``attach`` (also ``esper_telemetry.attach``) is the entry point; it returns a ``Telemetry``.
Names are imported on first use, so ``esper_telemetry.collector.cli`` starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .api import attach
    from .results import CaptureResult, GroupResult
    from .telemetry import Telemetry

__all__ = ["attach", "Telemetry", "CaptureResult", "GroupResult"]

_WHERE = {
    "attach": ".api",
    "Telemetry": ".telemetry",
    "CaptureResult": ".results",
    "GroupResult": ".results",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
