"""The structural isolation check: does a seed's input still carry a gradient path?

A seed must train on detached host features. If its forward input requires grad, the
seed's backward will flow into the host: that is found here, before any gradient exists, by
a forward pre-hook that reads only the ``requires_grad`` flag (host-side, no GPU work).
Reports are rate-limited per seed; suppressed repeats are counted in the next report.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Sequence

import torch

from esper_telemetry.defaults import MAX_STRING_CHARS

__all__ = ["StructuralCheck"]

_MIN_INTERVAL_S = 30.0


class StructuralCheck:
    """Forward pre-hooks on the seed modules; ``report(name, evidence)`` on a violation."""

    def __init__(self, report: Callable[[str, str], None], min_interval_s: float = _MIN_INTERVAL_S) -> None:
        self._report = report
        self._min_interval_s = min_interval_s
        self._handles: Dict[str, Any] = {}
        self._modules: Dict[str, Any] = {}
        self._last: Dict[str, float] = {}
        self._suppressed: Dict[str, int] = {}

    def watch(self, seeds: Sequence[Any]) -> None:
        """(Re)attach hooks to the seeds' current modules; seeds given as parameters have none."""
        for spec in seeds:
            module = spec.module
            if self._modules.get(spec.name) is module:
                continue
            old = self._handles.pop(spec.name, None)
            if old is not None:
                old.remove()
            self._modules[spec.name] = module
            if module is not None:
                self._handles[spec.name] = module.register_forward_pre_hook(
                    self._hook(spec.name), with_kwargs=True)

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._modules.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():
                return
            leaking = _leaking_inputs(args, kwargs)
            if leaking:
                self._violation(name, leaking)
        return hook

    def _violation(self, name: str, leaking: List[str]) -> None:
        now = time.monotonic()
        if now - self._last.get(name, -1e18) < self._min_interval_s:
            self._suppressed[name] = self._suppressed.get(name, 0) + 1
            return
        self._last[name] = now
        repeats = self._suppressed.pop(name, 0)
        evidence = (f"seed input {', '.join(leaking)} requires grad: its backward flows into the host"
                    + (f" ({repeats} more since the last report)" if repeats else ""))
        if len(evidence) > MAX_STRING_CHARS:  # the daemon rejects a longer string, and its batch
            evidence = evidence[:MAX_STRING_CHARS - 3] + "..."
        try:
            self._report(name, evidence)
        except Exception:  # a forward pass must never fail because of telemetry
            pass


def _leaking_inputs(args: tuple, kwargs: dict) -> List[str]:
    found = [f"arg {i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    found += [f"{k}=" for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    return found
