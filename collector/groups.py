"""Named parameter groups, resolved from the live model at every capture.

A group is given as a module, an iterable of parameters, a callable returning either, or a
dotted path under the root model. A spec keeps only weak references to what the user gave
(the module, the root model, the parameters) and re-resolves at every capture, so
``model.to(device)``, ``load_state_dict(assign=True)`` and a seed module replaced under a
path or behind a callable are picked up by the next capture instead of leaving it watching
dead tensors. What one resolution found (the parameters, the module) is held strongly only
until the next one, so a replaced module is released one capture later.

Re-listing a module's parameters walks its whole tree, so it happens only when something
may have changed: the spec now points at another object, a module or parameter was
registered anywhere in the process (torch's global registration hooks bump a counter), or
an entry of the tree's ``_parameters``/``_modules`` dicts is no longer the object it was
(written without a registration hook: ``.to()`` under
``set_overwrite_module_params_on_conversion(True)``, accelerate's
``set_module_tensor_to_device``). That last check compares object identities in C
(``map(operator.is_not, ...)``), one pointer per entry per capture.

A group that can no longer be followed (a module object or parameters given directly that
are no longer in the model, or no longer alive) is *stale*: ``stale_groups`` finds them
when a registration happened, and the collector reports each once.

What a group resolves to is made of leaves, each once. A member that is computed (a weight
under ``torch.nn.utils.parametrize``, whose ``module.weight`` is recomputed from
``parametrizations.weight.original*`` at each access, or a view) never holds a gradient:
it is followed through its autograd graph to the leaves it is computed from (a callable is
called with grad mode on for that), and one warning per group says so. A member that
cannot be followed (a computed tensor with no graph) makes the group stale, with its
reason. A parameter given twice (tied weights: GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) counts once, in the norm and in the parameter count.

Groups are disjoint: a parameter of a seed or named group is left out of the host (the
host module usually contains the seeds: a PEFT base model holds its adapters), and two
seeds or named groups may not share a parameter.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from esper_telemetry.defaults import MAX_GROUPS_PER_EVENT, MAX_STRING_CHARS

from .placement import held_numel, hidden_shards

__all__ = [
    "GroupSpec",
    "make_spec",
    "build_specs",
    "structural_names",
    "registration_generation",
    "disjoint",
    "stale_groups",
]

log = logging.getLogger("esper_telemetry.collector")

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

    __slots__ = (
        "name",
        "role",
        "isolated",
        "_target",
        "_kind",
        "_root",
        "_last_obj",
        "_last_gen",
        "_params",
        "module",
        "_tree",
        "_entries",
        "in_model",
        "unfollowed",
        "_noted",
        "_had_params",
    )

    def __init__(
        self,
        name: str,
        role: str,
        isolated: bool,
        target: Any,
        kind: str,
        root: Callable[[], Any] | None,
    ) -> None:
        self.name = name
        self.role = role
        self.isolated = isolated
        self._target = target
        self._kind = kind
        self._root = root
        self._last_obj: Callable[[], Any] | None = None
        self._last_gen = -1
        self._params: tuple[nn.Parameter, ...] = ()
        self.module: nn.Module | None = None  # set while the group is one live module
        # Live views of the values of the module tree's _parameters and _modules dicts, and
        # those values when the parameters were listed (then _END).
        self._tree: tuple[Any, ...] = ()
        self._entries: tuple[Any, ...] = ()
        # What the user gave was inside the root model at attach: leaving it makes the group stale.
        self.in_model = False
        # Why a member of the last resolution could not be followed to its leaves (None: all
        # were): the group is stale while it is set.
        self.unfollowed: str | None = None
        self._noted: set[str] = set()  # what was logged once already ("computed", "twice")
        self._had_params = False  # some resolution found parameters

    def _current(self) -> Any:
        if self._kind == "module":
            return self._target()  # None once the module is gone: stale, no parameters
        if self._kind == "path":
            root = self._root() if self._root is not None else None
            if root is None:
                raise LookupError(f"group {self.name!r}: the root model is gone")
            return root.get_submodule(self._target)
        if self._kind == "callable":
            # Grad mode on: a computed member (a parametrized weight, a view) then carries the
            # graph that leads to its leaves; captures run under no_grad.
            with torch.enable_grad():
                return self._target()
        # "params": weak references to fixed parameter objects
        return tuple(p for p in (r() for r in self._target) if p is not None)

    def resolve(self) -> tuple[tuple[nn.Parameter, ...], bool]:
        obj = self._current()
        gen = registration_generation()
        last = self._last_obj() if self._last_obj is not None else None
        same_obj = obj is last if isinstance(obj, nn.Module) else False
        if same_obj and gen == self._last_gen and not _rewritten(self._tree, self._entries):
            return self._params, False
        if isinstance(obj, nn.Module):
            params = tuple(obj.parameters())  # leaves, each once (remove_duplicate)
            hidden = hidden_shards(obj)  # DDP around tensor parallel (placement.py)
            if hidden:
                listed = set(map(id, params))
                params += tuple(p for _, p in hidden if id(p) not in listed)
            self.module = obj
            self.unfollowed = None
            if not params and self._had_params:
                # Its parameters left the module for FSDP1's FlatParameters (wrapped after
                # attach, use_orig_params=False): stale. A module emptied otherwise (a seed
                # slot culled to nn.Identity) simply has no gradient.
                root = self._root() if self._root is not None else None
                hint = _flat_hint(obj, root)
                if hint:
                    self.unfollowed = f"its module holds no parameters any more{hint}"
            # Empty dicts are left out (a leaf's _modules, a container's _parameters): half the
            # dicts of a real model, and filling one without a registration hook is not a swap.
            self._tree = tuple(
                d.values() for m in obj.modules() for d in (m._parameters, m._modules) if d
            )
            self._entries = (*itertools.chain.from_iterable(self._tree), _END)
        else:
            if obj is None and self._kind == "module":
                params = ()
            elif self._kind == "callable":
                params = self.leaves(_as_params(obj, self.name))
            else:  # parameters given: followed to their leaves once, at attach (make_spec)
                params = _as_params(obj, self.name)
            self.module = None
            self._tree = self._entries = ()
        self._last_obj = _ref(obj) if isinstance(obj, nn.Module) else None
        self._last_gen = gen
        changed = len(params) != len(self._params) or any(
            map(operator.is_not, params, self._params)
        )
        self._params = params
        self._had_params = self._had_params or bool(params)
        return params, changed

    def leaves(self, members: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``members`` as the leaves that hold their gradients, each once; sets ``unfollowed``.

        The common case (every member a leaf, and for a callable every one a ``Parameter``
        or requiring grad) costs a few C-level passes; the rest is ``follow_leaves``, logged
        once per group.
        """
        strict = self._kind == "callable"
        self.unfollowed = None
        if not all(map(_IS_LEAF, members)) or (
            strict
            and not all(map(isinstance, members, itertools.repeat(nn.Parameter)))
            and not all(map(_REQUIRES_GRAD, members))
        ):
            members, followed, lost = follow_leaves(members, strict)
            if lost:
                self.unfollowed = (
                    f"{lost} of its members are computed tensors with no autograd graph (made "
                    f"under no_grad or inference_mode, or detached): no gradient reaches them, "
                    f"and nothing leads from them to the parameters they came from"
                )
            if followed and "computed" not in self._noted:
                self._noted.add("computed")
                log.warning(
                    "esper-telemetry: group %r: %d of its members are computed tensors, not "
                    "parameters (a weight under torch.nn.utils.parametrize, a view), and never "
                    "hold a gradient; the group measures the parameters they are computed "
                    "from: %s",
                    self.name,
                    followed,
                    ", ".join(self._describe(members)),
                )
        if len(set(map(id, members))) != len(members):
            members = tuple({id(p): p for p in members}.values())
            if "twice" not in self._noted:
                self._noted.add("twice")
                log.info(
                    "group %r holds a parameter more than once (tied weights): counted once",
                    self.name,
                )
        return members

    def _describe(self, params: Sequence[torch.Tensor]) -> list[str]:
        """Names of ``params`` under the root model where it has them, else their shapes."""
        root = self._root() if self._root is not None else None
        names = {id(p): n for n, p in root.named_parameters()} if root is not None else {}
        return [names.get(id(p), f"a tensor of shape {tuple(p.shape)}") for p in params]

    def followed(self, modules: set | None, params: set | None) -> bool:
        """False when what the user gave directly is gone, or no longer in the model, or a
        member could not be followed to its leaves (``unfollowed``).

        ``modules`` and ``params``: ids of the root model's modules and parameters (None
        without a root). Dotted paths and callables otherwise always follow the model.
        """
        if self.unfollowed is not None:
            return False
        return self.inside(modules, params, check=self.in_model)

    def inside(self, modules: set | None, params: set | None, check: bool = True) -> bool:
        """True while what the user gave is alive and (with ``check``) in the model."""
        check = check and modules is not None and params is not None
        if self._kind == "module":
            target = self._target()
            return target is not None and (not check or id(target) in modules)  # type: ignore[operator]
        if self._kind == "params":
            live = [r() for r in self._target]
            return all(p is not None and (not check or id(p) in params) for p in live)  # type: ignore[operator]
        return True


_END = object()  # ends the entries: one more or one fewer entry shows as a mismatch there
_IS_LEAF = operator.attrgetter("is_leaf")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
# A computed member's graph is walked this far at most (a parametrization's is a few nodes;
# a tensor at the end of a forward pass is not a parameter the user meant).
MAX_GRAPH_NODES = 10_000


def follow_leaves(
    members: Sequence[torch.Tensor], strict: bool
) -> tuple[tuple[torch.Tensor, ...], int, int]:
    """Each member that cannot hold a gradient replaced by the leaves it is computed from.

    Returns ``(params, followed, lost)``: the leaves (members that are leaves as they are,
    in order), how many members were followed through their autograd graph (or, for a view
    of a parameter made without one, to its base), and how many could not be (no graph, or
    one larger than ``MAX_GRAPH_NODES``: left out). ``strict`` (a callable's members,
    computed anew at each call): a leaf that is neither a ``Parameter`` nor requires grad
    is such a computed tensor too; given directly, it is the user's tensor and kept.
    """
    out: list[torch.Tensor] = []
    followed = lost = 0
    for t in members:
        if t.is_leaf and (not strict or t.requires_grad or isinstance(t, nn.Parameter)):
            out.append(t)
            continue
        leaves = _graph_leaves(t)
        if leaves is None and t._base is not None and isinstance(t._base, nn.Parameter):
            leaves = [t._base]  # a view of a frozen parameter: no graph, but its base
        if leaves is None:
            lost += 1
        else:
            followed += 1
            out.extend(leaves)
    return tuple(out), followed, lost


def _graph_leaves(t: torch.Tensor) -> list[torch.Tensor] | None:
    """The leaves ``t`` was computed from (the variables of its graph's AccumulateGrad
    nodes), in the graph's order; None without a graph or past ``MAX_GRAPH_NODES``."""
    if t.grad_fn is None:
        return None
    out: list[torch.Tensor] = []
    seen: set = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if len(seen) >= MAX_GRAPH_NODES:
            return None
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            out.append(variable)
        else:
            stack.extend(reversed([n for n, _ in node.next_functions]))
    return out


def _rewritten(tree: tuple[Any, ...], entries: tuple[Any, ...]) -> bool:
    """True if an entry of these dicts (``tree``: their live value views) is not what it was.

    One pass in C, by identity: a replaced parameter is never compared by value (a tensor
    comparison would read it, and on a GPU wait for it).
    """
    if not tree:
        return False
    return any(
        map(operator.is_not, itertools.chain(itertools.chain.from_iterable(tree), (_END,)), entries)
    )


def disjoint(
    specs: Sequence[GroupSpec], group_params: Sequence[tuple[torch.Tensor, ...]]
) -> tuple[list[tuple[torch.Tensor, ...]], list[str]]:
    """The groups' parameters with every other group's left out of the host; and those groups.

    Seeds and named groups are usually inside the host module (adapters inside the base
    model): their parameters are counted in their own group only.
    """
    out = list(group_params)
    hosts = [i for i, s in enumerate(specs) if s.role == "host"]
    if not hosts:
        return out, []
    (h,) = hosts
    others = {id(p): s.name for s, ps in zip(specs, group_params) if s.role != "host" for p in ps}
    if not others:
        return out, []
    inside = sorted({others[id(p)] for p in group_params[h] if id(p) in others})
    if inside:
        out[h] = tuple(p for p in group_params[h] if id(p) not in others)
    return out, inside


def _members(specs: Sequence[GroupSpec]) -> tuple[set | None, set | None]:
    """Ids of the root model's modules and parameters (None, None without a root)."""
    roots = {id(r): r for r in (s._root() for s in specs if s._root is not None) if r is not None}
    if len(roots) != 1:
        return None, None
    (root,) = roots.values()
    params = {id(p) for p in root.parameters()}
    params.update(id(p) for _, p in hidden_shards(root))  # DDP around TP (placement.py)
    return {id(m) for m in root.modules()}, params


def stale_groups(specs: Sequence[GroupSpec]) -> list[str]:
    """Names of the groups that can no longer be followed (see ``GroupSpec.followed``)."""
    modules, params = _members(specs)
    return [s.name for s in specs if not s.followed(modules, params)]


def _as_params(obj: Any, name: str) -> tuple[nn.Parameter, ...]:
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
            raise TypeError(
                f"group {name!r}: {type(item).__name__} is not a parameter (a group is a module, "
                f"parameters, a callable returning either, or a dotted path)"
            )
    return items  # type: ignore[return-value]


def make_spec(
    name: str,
    role: str,
    isolated: bool,
    value: Any,
    model: nn.Module | None,
    allow_empty: bool = False,
) -> GroupSpec:
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
            raise ValueError(
                f"group {name!r}: no submodule {value!r} under the model: {exc}"
            ) from None
        spec = GroupSpec(name, role, isolated, value, "path", root)
    elif callable(value):
        spec = GroupSpec(name, role, isolated, value, "callable", root)
    else:
        # Computed members (a parametrized weight) are followed to their leaves now, while
        # they are alive: only the leaves are held, weakly, like any parameter given.
        probe = GroupSpec(name, role, isolated, None, "params", root)
        params = probe.leaves(_as_params(value, name))
        spec = GroupSpec(name, role, isolated, tuple(_ref(p) for p in params), "params", root)
        spec.unfollowed, spec._noted = probe.unfollowed, probe._noted
    params, _ = spec.resolve()
    if not params and not allow_empty:
        given = value if isinstance(value, nn.Module) else None
        raise ValueError(f"group {name!r} has no parameters{_flat_hint(given, model)}")
    return spec


def _flat_hint(*modules: nn.Module | None) -> str:
    """Why a module may hold no parameters of its own: FSDP1 flattened them (into a
    FlatParameter of the unit around it, which ``modules``, the group's and the root model,
    would hold)."""
    for module in modules:
        if module is not None and any(
            getattr(p, "_is_flat_param", False) for p in module.parameters()
        ):
            return (
                ": FSDP (FullyShardedDataParallel with use_orig_params=False) holds the "
                "parameters flattened, one FlatParameter per FSDP unit; wrap with "
                "use_orig_params=True, or make the group an FSDP unit of its own"
            )
    return ""


def build_specs(
    model: nn.Module | None,
    host: Any,
    seeds: dict[str, Any] | None,
    groups: dict[str, Any] | None,
    isolated: Iterable[str],
) -> list[GroupSpec]:
    """All groups of one ``attach`` call, host first; raises on unknown or duplicate names."""
    if isinstance(isolated, (str, bytes)):
        raise TypeError(
            f"isolated= takes a collection of group names, not the string {isolated!r}: "
            f"write isolated=({isolated!r},)"
        )
    try:
        isolated = set(isolated or ())
    except TypeError:
        raise TypeError(
            f"isolated= takes a collection of group names, got {type(isolated).__name__}"
        ) from None
    if not all(isinstance(n, str) for n in isolated):
        raise TypeError(f"isolated= takes group names (strings), got {sorted(map(repr, isolated))}")
    named: list[tuple[str, str, Any]] = []
    # With a model and no host, the host is "everything not in another group".
    auto_host = host is None and model is not None
    if host is not None or auto_host:
        named.append(("host", "host", model if auto_host else host))
    for role, argument, mapping in (("seed", "seeds", seeds), ("group", "groups", groups)):
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(
                f"{argument}= takes a mapping of group name to group (a module, parameters, "
                f"a callable or a dotted path), got {type(mapping).__name__}"
            )
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
        raise ValueError(
            f"group names are at most {MAX_STRING_CHARS} characters; "
            f"got one of {len(too_long[0])}: {too_long[0][:40]!r}..."
        )
    if len(names) > MAX_GROUPS_PER_EVENT:
        raise ValueError(
            f"at most {MAX_GROUPS_PER_EVENT} groups per collector, got {len(names)} groups"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate group names: {dupes}")
    unknown = sorted(isolated - set(names))
    if unknown:
        raise ValueError(f"isolated names unknown groups: {unknown}; groups are {names}")
    specs = [
        make_spec(n, r, n in isolated, v, model, allow_empty=auto_host and r == "host")
        for n, r, v in named
    ]
    params = [spec.resolve()[0] for spec in specs]
    modules, members = _members(specs)
    for spec in specs:  # given inside the model: leaving it later makes the group stale
        spec.in_model = modules is not None and spec.inside(modules, members)
    owner: dict[int, str] = {}
    for spec, ps in zip(specs, params):
        if spec.role == "host":
            continue
        for p in ps:
            other = owner.setdefault(id(p), spec.name)
            if other != spec.name:
                raise ValueError(
                    f"groups {other!r} and {spec.name!r} share a parameter of shape "
                    f"{tuple(p.shape)}: groups other than the host must be disjoint"
                )
    kept, inside = disjoint(specs, params)
    if auto_host and not kept[0]:
        if len(specs) == 1:
            raise ValueError("attach needs at least one group with parameters: the model has none")
        return specs[1:]  # every parameter of the model is in a named group: no host
    if specs[0].role == "host" and not kept[0]:
        raise ValueError("group 'host' has no parameters of its own: every one is in another group")
    if inside:
        log.info(
            "host contains the parameters of %s: each is counted in its own group only",
            ", ".join(repr(n) for n in inside),
        )
    return specs


def total_params(params: Sequence[torch.Tensor]) -> int:
    """Logical scalar count; a DTensor reports its global size, so shards count once (so
    does a local shard carrying its DTensor's spec: DDP around tensor parallel)."""
    return sum(_numel(p) for p in params)


def _numel(p: torch.Tensor) -> int:
    shape = getattr(getattr(p, "_st_info", None), "shape", None)
    return held_numel(p) if shape is None else math.prod(shape)


def structural_names(structural: Any, specs: Sequence[GroupSpec]) -> tuple[str, ...]:
    """The groups the structural check watches: ``True`` for every seed, else the names given.

    Each must name a group that is a module (the check is a forward pre-hook on it).
    """
    if structural is True:
        return tuple(s.name for s in specs if s.role == "seed" and s.module is not None)
    if structural is False or structural is None:
        return ()
    if isinstance(structural, (str, bytes)):
        raise TypeError(
            f"structural= takes True or a collection of group names, not the string "
            f"{structural!r}: write structural=({structural!r},)"
        )
    try:
        names = tuple(structural)
    except TypeError:
        raise TypeError(
            f"structural= takes True or a collection of group names, "
            f"got {type(structural).__name__}"
        ) from None
    by_name = {s.name: s for s in specs}
    for name in names:
        spec = by_name.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ValueError(
                f"structural= names unknown group {name!r}; groups are {list(by_name)}"
            )
        if spec.module is None:
            raise ValueError(
                f"structural= names {name!r}, which is not a module: the check hooks "
                f"the module's forward"
            )
    return names
