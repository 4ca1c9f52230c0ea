"""``peft_groups``: the groups a user means for a PEFT model, as ``attach`` keyword arguments.

    tel = et.attach(**et.peft_groups(model), run="lora-7")
    trainer = Trainer(..., callbacks=[EsperCallback(**et.peft_groups(model))])

- **seeds**: the adapters, one group per adapter name ("default", ...), or one per adapted
  module and adapter with ``per_module=True`` (named ``"ADAPTER:PATH"``, the path without
  PEFT's ``base_model.model.`` prefix). Each is a callable that re-resolves its module paths
  under the model at every capture, so ``model.to()``, a reloaded or replaced adapter layer
  at the same path are followed; adapter layers added after ``peft_groups`` are not.
- **host**: every other parameter of the model (``model=`` without ``host=``: "every parameter
  in no other group"), so the frozen base, including the originals kept by
  ``modules_to_save``; declared **isolated** when all of them are frozen at the time of the
  call, so a base weight that starts receiving gradient is reported as a violation (frozen
  weights that silently train are a known failure).

Adapters are found the way PEFT itself lists them: every module with an
``adapter_layer_names`` attribute (PEFT's ``BaseTunerLayer`` and ``AuxiliaryTrainingWrapper``:
LoRA and its relatives, IA3, ``modules_to_save``, trainable tokens), whose named containers
are keyed by adapter name, plus a ``PeftModel``'s ``prompt_encoder`` for prompt learning. No
PEFT import is needed, so a model that transformers injected adapters into works the same.

Why here and not in ``collector/``: it knows one third-party library's layout; the collector
stays about groups of parameters, whoever made them.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from esper_telemetry.defaults import MAX_GROUPS_PER_EVENT, MAX_STRING_CHARS

__all__ = ["peft_groups", "AdapterParams"]

log = logging.getLogger("esper_telemetry.integrations")

_PREFIX = "base_model.model."


def peft_groups(model: nn.Module, per_module: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``attach`` (or the trainer callbacks) watching a PEFT model.

    Returns ``{"model": model, "seeds": {name: callable, ...}}``, plus
    ``"isolated": ("host",)`` when every non-adapter parameter is frozen. Raises
    ``TypeError`` for a non-module and ``ValueError`` when the model holds no adapter or
    ``per_module=True`` would make more groups than one collector may declare.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"peft_groups takes a torch.nn.Module (a PeftModel), got {type(model).__name__}"
        )
    if not isinstance(per_module, bool):
        raise TypeError(f"per_module= takes True or False, got {per_module!r}")
    adapters: dict[str, list[str]] = {}  # adapter name -> paths of the modules holding it
    claimed: dict[str, set] = {}  # adapter name -> ids of its parameters found so far
    for path, module in model.named_modules():
        for name in _adapter_names(module):
            # A wrapper and the tuner layer inside it may list the same weights (trainable tokens).
            ids = {id(p) for p in _adapter_params(module, name)}
            seen = claimed.setdefault(name, set())
            if ids <= seen:
                continue
            seen |= ids
            adapters.setdefault(name, []).append(path)
    if not adapters:
        raise ValueError(
            "peft_groups: the model holds no PEFT adapter (no module with PEFT's "
            "adapter_layer_names, no prompt encoder); give the groups to attach yourself"
        )
    root = weakref.ref(model)
    seeds: dict[str, AdapterParams] = {}
    for adapter, paths in adapters.items():
        if per_module:
            for path in paths:
                seeds[f"{adapter}:{_short(path)}"] = AdapterParams(root, adapter, (path,))
        else:
            seeds[adapter] = AdapterParams(root, adapter, tuple(paths))
    if len(seeds) + 1 > MAX_GROUPS_PER_EVENT:
        raise ValueError(
            f"peft_groups: {len(seeds)} adapted modules make {len(seeds) + 1} groups; a "
            f"collector declares at most {MAX_GROUPS_PER_EVENT}: use per_module=False"
        )
    too_long = [n for n in seeds if len(n) > MAX_STRING_CHARS]
    if too_long:
        raise ValueError(
            f"peft_groups: group name of {len(too_long[0])} characters (at most "
            f"{MAX_STRING_CHARS}): {too_long[0][:60]!r}...; use per_module=False"
        )
    adapter_ids = {id(p) for seed in seeds.values() for p in seed()}
    base = [(n, p) for n, p in model.named_parameters() if id(p) not in adapter_ids]
    trainable = [n for n, p in base if p.requires_grad]
    kwargs: dict[str, Any] = {"model": model, "seeds": dict(seeds)}
    if base and not trainable:
        kwargs["isolated"] = ("host",)
    elif trainable:
        log.info(
            "peft_groups: %d base parameters require grad (%s%s): the host is not declared "
            "isolated",
            len(trainable),
            trainable[0],
            ", ..." if len(trainable) > 1 else "",
        )
    return kwargs


class AdapterParams:
    """A seed group: the parameters of one adapter in the modules at ``paths``, resolved now.

    Holds the model weakly; a path that no longer resolves contributes nothing (the group
    then reports "no gradient" rather than a stale figure).
    """

    __slots__ = ("_root", "adapter", "paths")

    def __init__(
        self, root: Callable[[], nn.Module | None], adapter: str, paths: Sequence[str]
    ) -> None:
        self._root = root
        self.adapter = adapter
        self.paths = tuple(paths)

    def __call__(self) -> list[torch.Tensor]:
        model = self._root()
        if model is None:
            return []
        seen = set()
        out: list[torch.Tensor] = []
        for path in self.paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            for p in _adapter_params(module, self.adapter):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def __repr__(self) -> str:
        where = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} modules"
        return f"AdapterParams({self.adapter!r} in {where})"


def _short(path: str) -> str:
    """A module path for a group name, PEFT's wrapper prefix dropped.

    The root's path is empty: what the root holds is its prompt encoder, so it is named so.
    """
    short = (
        path.replace(_PREFIX, "", 1) if path.startswith(_PREFIX) or f".{_PREFIX}" in path else path
    )
    return short or "prompt_encoder"


def _containers(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s attributes that hold adapter weights keyed by adapter name."""
    names = getattr(module, "adapter_layer_names", None)
    if isinstance(names, (tuple, list)) and all(isinstance(n, str) for n in names):
        return tuple(names)
    if isinstance(getattr(module, "prompt_encoder", None), nn.ModuleDict) and hasattr(
        module, "peft_config"
    ):
        return ("prompt_encoder",)
    return ()


def _entries(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(adapter name, module or parameter)`` of every container of ``module``."""
    for attr in _containers(module):
        try:
            container = attrgetter(attr)(module)
        except AttributeError:
            continue
        items = getattr(container, "items", None)
        if callable(items):
            yield from items()


def _adapter_names(module: nn.Module) -> list[str]:
    """The adapters that have parameters in ``module``'s containers, in order of appearance."""
    names: list[str] = []
    for name, value in _entries(module):
        has = isinstance(value, torch.Tensor) or (
            isinstance(value, nn.Module) and next(value.parameters(), None) is not None
        )
        if has and name not in names:
            names.append(name)
    return names


def _adapter_params(module: nn.Module, adapter: str) -> Iterator[torch.Tensor]:
    for name, value in _entries(module):
        if name != adapter:
            continue
        if isinstance(value, nn.Module):
            yield from value.parameters()
        elif isinstance(value, torch.Tensor):
            yield value
