"""Running the collector's entry points eagerly, also when called from a compiled region.

``capture()`` and the optimizer hooks may be reached from code ``torch.compile`` traces
(a compiled training step, a compiled ``optimizer.step``). Dynamo must not trace them: they
read Python state, start device work on side streams and hand records to threads, none of
which belongs in a graph (tracing ``capture`` raised inside dynamo). Under a trace the call
goes through ``torch.compiler.disable``: one graph break at the call, and the body runs
eagerly at run time, every time. Outside a trace the call is direct, and ``torch._dynamo``
(over a second to import) is never imported by us.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["eager"]

_disabled: dict[Callable[..., Any], Callable[..., Any]] = {}


def eager(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, run eagerly even when dynamo is tracing the caller."""
    if torch.compiler.is_compiling():
        wrapped = _disabled.get(fn)
        if wrapped is None:
            wrapped = _disabled[fn] = torch.compiler.disable(fn)
        return wrapped(*args, **kwargs)
    return fn(*args, **kwargs)
