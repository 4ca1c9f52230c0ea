"""The structural isolation check: does a watched seed's input still carry a gradient path?

Esper's contract for a seed trained on detached host features: if the seed's forward input
requires grad, its backward flows into the host. That is found here, before any gradient
exists, by a forward pre-hook that reads only ``requires_grad`` flags (host-side, no GPU
work). The check is opt-in per group (``attach(structural=...)``): for LoRA adapters (whose
inputs require grad because earlier adapters train) or a head trained with its backbone,
an input that requires grad is normal.

The hook only notes what it saw (cheap, and simple enough for dynamo to trace without a
graph break); each capture then reports every noted seed once, for that capture's step, so
while a leak persists every captured step carries a violation, and a flood of forward
passes costs one event per seed per capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from esper_telemetry.defaults import MAX_STRING_CHARS

__all__ = ["StructuralCheck"]


class StructuralCheck:
    """Forward pre-hooks on the modules of the groups named in ``names``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)
        self._handles: dict[str, Any] = {}
        self._modules: dict[str, Any] = {}
        self._seen: dict[str, tuple[list[str], int]] = {}  # name -> (inputs, forward passes)

    def watch(self, specs: Sequence[Any]) -> None:
        """(Re)attach hooks to the named groups' current modules."""
        for spec in specs:
            if spec.name not in self.names:
                continue
            module = spec.module
            if self._modules.get(spec.name) is module:
                continue
            old = self._handles.pop(spec.name, None)
            if old is not None:
                old.remove()
            self._modules[spec.name] = module
            if module is not None:
                self._handles[spec.name] = module.register_forward_pre_hook(
                    self._hook(spec.name), with_kwargs=True
                )

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._modules.clear()

    def take(self) -> list[tuple[str, str]]:
        """(group, evidence) for every group that leaked since the last call; clears them."""
        seen, self._seen = self._seen, {}
        out = []
        for name, (inputs, passes) in seen.items():
            evidence = (
                f"seed input {', '.join(inputs)} requires grad: its backward flows into the host"
                f" ({passes} forward pass{'es' if passes != 1 else ''} since the last capture)"
            )
            if (
                len(evidence) > MAX_STRING_CHARS
            ):  # the daemon rejects a longer string, and its batch
                evidence = evidence[: MAX_STRING_CHARS - 3] + "..."
            out.append((name, evidence))
        return out

    def _hook(self, name: str) -> Callable[..., None]:
        seen = self

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():
                return
            leaking = [
                f"arg {i}"
                for i, a in enumerate(args)
                if isinstance(a, torch.Tensor) and a.requires_grad
            ]
            leaking += [
                f"{k}="
                for k, v in kwargs.items()
                if isinstance(v, torch.Tensor) and v.requires_grad
            ]
            if leaking:
                before = seen._seen.get(name)
                seen._seen[name] = (leaking, 1 if before is None else before[1] + 1)

        return hook
