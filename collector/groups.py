"""Named parameter groups, resolved from the live model at every capture.

A group is given as a module, an iterable of parameters, a callable returning either, or a
dotted path under the root model. A spec keeps only weak references to what the user gave
(the module, the root model, the parameters) and re-resolves at every capture, so
``model.to(device)``, ``load_state_dict(assign=True)`` and a seed module replaced under a
path or behind a callable are picked up by the next capture instead of leaving it watching
dead tensors. What one resolution found (the parameters, the module) is held strongly only
until the next one, so a replaced module is released one capture later.

Re-listing a module's parameters walks its whole tree, so it happens only when something
may have changed: the spec now points at another object, or a module or parameter was
registered anywhere in the process (torch's global registration hooks bump a counter).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from esper_telemetry.defaults import MAX_GROUPS_PER_EVENT, MAX_STRING_CHARS

__all__ = ["GroupSpec", "make_spec", "build_specs", "structural_names", "registration_generation"]

_generation = itertools.count(1)
_current_generation = [0]
_hooks_installed = [False]


def _bump(*_args: Any) -> None:
    _current_generation[0] = next(_generation)


def registration_generation() -> int:
    """A counter that changes whenever any module or parameter is registered in this process."""
    if not _hooks_installed[0]:
        from torch.nn.modules import module as _module

        _module.register_module_module_registration_hook(_bump)
        _module.register_module_parameter_registration_hook(_bump)
        _hooks_installed[0] = True
    return _current_generation[0]


def _ref(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # pragma: no cover - every nn.Module and Parameter is weakref-able
        return lambda: obj


class GroupSpec:
    """One named group: how to find its parameters now, and what it found last time.

    ``resolve()`` returns ``(params, changed)``; ``params`` is a tuple of the live
    parameters, ``changed`` says whether they differ from the previous call's.
    """

    __slots__ = ("name", "role", "isolated", "_target", "_kind", "_root", "_last_obj",
                 "_last_gen", "_params", "module")

    def __init__(self, name: str, role: str, isolated: bool, target: Any, kind: str,
                 root: Optional[Callable[[], Any]]) -> None:
        self.name = name
        self.role = role
        self.isolated = isolated
        self._target = target
        self._kind = kind
        self._root = root
        self._last_obj: Optional[Callable[[], Any]] = None
        self._last_gen = -1
        self._params: Tuple[nn.Parameter, ...] = ()
        self.module: Optional[nn.Module] = None  # set while the group is one live module

    def _current(self) -> Any:
        if self._kind == "module":
            return self._target()
        if self._kind == "path":
            root = self._root() if self._root is not None else None
            if root is None:
                raise LookupError(f"group {self.name!r}: the root model is gone")
            return root.get_submodule(self._target)
        if self._kind == "callable":
            return self._target()
        # "params": weak references to fixed parameter objects
        return tuple(p for p in (r() for r in self._target) if p is not None)

    def resolve(self) -> Tuple[Tuple[nn.Parameter, ...], bool]:
        obj = self._current()
        gen = registration_generation()
        last = self._last_obj() if self._last_obj is not None else None
        same_obj = obj is last if isinstance(obj, nn.Module) else False
        if same_obj and gen == self._last_gen:
            return self._params, False
        if isinstance(obj, nn.Module):
            params = tuple(obj.parameters())
            self.module = obj
        else:
            params = _as_params(obj, self.name)
            self.module = None
        self._last_obj = _ref(obj) if isinstance(obj, nn.Module) else None
        self._last_gen = gen
        changed = len(params) != len(self._params) or any(
            a is not b for a, b in zip(params, self._params)
        )
        self._params = params
        return params, changed


def _as_params(obj: Any, name: str) -> Tuple[nn.Parameter, ...]:
    if isinstance(obj, torch.Tensor):
        return (obj,)  # type: ignore[return-value]
    try:
        items = tuple(obj)
    except TypeError:
        raise TypeError(
            f"group {name!r}: expected a module, parameters, a callable or a dotted path, "
            f"got {type(obj).__name__}"
        ) from None
    for item in items:
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"group {name!r}: {type(item).__name__} is not a parameter (a group is a module, "
                            f"parameters, a callable returning either, or a dotted path)")
    return items  # type: ignore[return-value]


def make_spec(name: str, role: str, isolated: bool, value: Any,
              model: Optional[nn.Module]) -> GroupSpec:
    """Normalize one user-given group spec; misuse raises at once with the group's name."""
    root = _ref(model) if model is not None else None
    if isinstance(value, nn.Module):
        spec = GroupSpec(name, role, isolated, _ref(value), "module", root)
    elif isinstance(value, str):
        if model is None:
            raise ValueError(f"group {name!r}: a dotted path {value!r} needs model=")
        try:
            model.get_submodule(value)
        except AttributeError as exc:
            raise ValueError(f"group {name!r}: no submodule {value!r} under the model: {exc}") from None
        spec = GroupSpec(name, role, isolated, value, "path", root)
    elif callable(value):
        spec = GroupSpec(name, role, isolated, value, "callable", root)
    else:
        params = _as_params(value, name)
        spec = GroupSpec(name, role, isolated, tuple(_ref(p) for p in params), "params", root)
    params, _ = spec.resolve()
    if not params:
        raise ValueError(f"group {name!r} has no parameters")
    return spec


def build_specs(model: Optional[nn.Module], host: Any, seeds: Optional[Dict[str, Any]],
                groups: Optional[Dict[str, Any]], isolated: Iterable[str]) -> List[GroupSpec]:
    """All groups of one ``attach`` call, host first; raises on unknown or duplicate names."""
    if isinstance(isolated, (str, bytes)):
        raise TypeError(f"isolated= takes a collection of group names, not the string {isolated!r}: "
                        f"write isolated=({isolated!r},)")
    try:
        isolated = set(isolated or ())
    except TypeError:
        raise TypeError(f"isolated= takes a collection of group names, got {type(isolated).__name__}") from None
    if not all(isinstance(n, str) for n in isolated):
        raise TypeError(f"isolated= takes group names (strings), got {sorted(map(repr, isolated))}")
    named: List[Tuple[str, str, Any]] = []
    if host is not None:
        named.append(("host", "host", host))
    for role, argument, mapping in (("seed", "seeds", seeds), ("group", "groups", groups)):
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(f"{argument}= takes a mapping of group name to group (a module, parameters, "
                            f"a callable or a dotted path), got {type(mapping).__name__}")
        for name, value in (mapping or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"group names are non-empty strings, got {name!r}")
            named.append((name, role, value))
    if not named:
        raise ValueError("attach needs at least one group: host=, seeds= or groups=")
    names = [n for n, _, _ in named]
    # The daemon rejects a whole message that breaks a wire limit: refuse here, not later.
    too_long = [n for n in names if len(n) > MAX_STRING_CHARS]
    if too_long:
        raise ValueError(f"group names are at most {MAX_STRING_CHARS} characters; "
                         f"got one of {len(too_long[0])}: {too_long[0][:40]!r}...")
    if len(names) > MAX_GROUPS_PER_EVENT:
        raise ValueError(f"at most {MAX_GROUPS_PER_EVENT} groups per collector, got {len(names)} groups")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate group names: {dupes}")
    unknown = sorted(isolated - set(names))
    if unknown:
        raise ValueError(f"isolated names unknown groups: {unknown}; groups are {names}")
    return [make_spec(n, r, n in isolated, v, model) for n, r, v in named]


def total_params(params: Sequence[torch.Tensor]) -> int:
    """Logical scalar count; a DTensor reports its global size, so shards count once."""
    return sum(p.numel() for p in params)


def structural_names(structural: Any, specs: Sequence[GroupSpec]) -> Tuple[str, ...]:
    """The groups the structural check watches: ``True`` for every seed, else the names given.

    Each must name a group that is a module (the check is a forward pre-hook on it).
    """
    if structural is True:
        return tuple(s.name for s in specs if s.role == "seed" and s.module is not None)
    if structural is False or structural is None:
        return ()
    if isinstance(structural, (str, bytes)):
        raise TypeError(f"structural= takes True or a collection of group names, not the string "
                        f"{structural!r}: write structural=({structural!r},)")
    try:
        names = tuple(structural)
    except TypeError:
        raise TypeError(f"structural= takes True or a collection of group names, "
                        f"got {type(structural).__name__}") from None
    by_name = {s.name: s for s in specs}
    for name in names:
        spec = by_name.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ValueError(f"structural= names unknown group {name!r}; groups are {list(by_name)}")
        if spec.module is None:
            raise ValueError(f"structural= names {name!r}, which is not a module: the check hooks "
                             f"the module's forward")
    return names
