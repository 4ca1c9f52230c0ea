"""Which gradient elements this rank counts, so that adding every rank's sums is exact.

The daemon adds the ranks' sums of squares of a sharded group for a step (README,
"Distributed"), so each element of each gradient must be counted on exactly one rank of
the world, whatever the mesh, without a collective in the training process:

- along a ``Shard`` mesh dimension the local squares add (each rank holds other elements);
- along a ``Replicate`` dimension only the rank at coordinate 0 of that dimension counts;
- a plain tensor in a group with DTensors is replicated over their mesh: only the rank at
  coordinate 0 on every dimension counts it;
- a ``Partial`` gradient is not a gradient yet (its sum over ranks is): the group cannot be
  measured and is reported as unknown, never as a number.

"The mesh" is the largest mesh among every watched DTensor's (this rank in it). A DTensor
on a sub-mesh of it (FSDP2 + tensor parallel shards a LayerNorm over the data-parallel
sub-mesh only) is replicated along the dimensions its sub-mesh does not span, and counts
only at coordinate 0 of those. Dimensions no DTensor spans (a pipeline stage, DDP around a
tensor-parallel model, experts split over ranks as plain modules) are invisible here: the
fingerprint of what this rank counts (``fingerprint.py``) tells the daemon which ranks hold
the same elements there (replicas, counted once) and which hold others (parts, added).

Megatron-core's tensor parallelism holds no DTensor either: its sharded weights are plain
Parameters marked ``tensor_model_parallel`` (``partition_dim`` says along which dimension),
and every other parameter of the model is the same on each rank of the tensor-parallel
group. In a group with such a weight, as Megatron's own gradient norm does, this rank
counts the marked ones and the others only at tensor-parallel rank 0 (``megatron_tp``);
the fingerprint carries the tensor-parallel rank of each marked one.

Importing ``torch.distributed.tensor`` costs about half a second, so it is never imported
here: a DTensor cannot exist before something else imported that module. Megatron-core is
looked up the same way, never imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "Layout",
    "layout",
    "spec_of",
    "hidden_shards",
    "held_numel",
    "megatron_tp",
    "tensor_parallel",
    "local_grads",
    "UnmeasurableGradient",
    "unmeasurable",
]


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


class UnmeasurableGradient(RuntimeError):
    """Groups whose gradients this capture cannot measure (a ``Partial`` DTensor gradient)."""


def unmeasurable(reasons: dict[str, str]) -> UnmeasurableGradient:
    """The error counted for one capture, naming each group and why; ``reasons`` by group name."""
    what = "; ".join(f"group {name!r}: {why}" for name, why in reasons.items())
    return UnmeasurableGradient(
        f"{what}; reported as unknown (sq None) for this capture, never as a number"
    )


class Layout(NamedTuple):
    """How the watched groups are laid out over the world, as seen from this rank.

    ``sharded``: per group, whether this rank's value is only its contribution (``local``):
    the daemon combines the ranks' values; else it is the group's.
    ``counted``: per flat parameter, whether this rank adds its squares; None when every
    one is (no mask, the common case). ``placements``: per flat parameter its DTensor
    placements (None for a plain tensor); None when no parameter is a DTensor.
    """

    sharded: list[bool]
    counted: list[bool] | None
    owner: tuple[int, ...]
    placements: tuple[Any, ...] | None


def spec_of(p: torch.Tensor) -> tuple[Any, tuple[Any, ...]] | None:
    """A DTensor's mesh and placements, or None for a plain tensor.

    A plain Parameter carrying ``_st_info`` is a DTensor's local shard made a Parameter by
    ``DistributedDataParallel(..., device_mesh=...)`` around a tensor-parallel model (torch's
    ``_localize_dtensor``): it keeps the DTensor's spec there, and is a shard like it.
    """
    cls = _dtensor_type()
    if cls is not None and isinstance(p, cls):
        return p.device_mesh, p.placements
    info = getattr(p, "_st_info", None)
    if info is not None and hasattr(info, "mesh") and hasattr(info, "placements"):
        return info.mesh, tuple(info.placements)
    return None


def hidden_shards(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The local-shard Parameters that DDP around tensor parallel keeps behind DTensor
    attributes of ``module``'s tree, with their qualified names.

    ``DistributedDataParallel(model, device_mesh=mesh["dp"])`` around a model parallelized
    over a sibling mesh dimension makes each DTensor Parameter a plain local Parameter
    carrying ``_st_info``, and its forward pre-hook puts a DTensor built from it
    (``DTensor.from_local``, a view of it) back in the attribute, no longer registered: from
    the first forward on ``module.parameters()`` lists none of those weights, though their
    gradients still arrive on the local Parameters (the view's base). Empty while no DTensor
    exists.
    """
    cls = _dtensor_type()
    if cls is None:
        return []
    out = []
    for prefix, m in module.named_modules():
        for attr, value in vars(m).items():
            if isinstance(value, cls):
                base = getattr(value, "_local_tensor", None)
                base = getattr(base, "_base", None)
                if base is not None and getattr(base, "_st_info", None) is not None:
                    out.append((f"{prefix}.{attr}" if prefix else attr, base))
    return out


def megatron_tp() -> tuple[int, int] | None:
    """This rank's place in Megatron-core's tensor-parallel group, ``(rank, size)``; None
    where Megatron-core is not imported, its groups not made, or the group is one rank."""
    state = sys.modules.get("megatron.core.parallel_state")
    if state is None:
        return None
    try:
        if state.get_tensor_model_parallel_group(check_initialized=False) is None:
            return None
        size = state.get_tensor_model_parallel_world_size()
        rank = state.get_tensor_model_parallel_rank()
    except Exception:  # another Megatron-core than the one this was written for
        return None
    return (int(rank), int(size)) if size > 1 else None


def tensor_parallel(p: torch.Tensor) -> bool:
    """A weight Megatron-core's tensor parallelism split over its group (each rank a part)."""
    return bool(getattr(p, "tensor_model_parallel", False))


def held_numel(p: torch.Tensor) -> int:
    """The elements ``p`` holds on this rank: a ``FlatParameter`` (FSDP1 with
    ``use_orig_params=False``) without the padding that makes its shards even."""
    infos = getattr(p, "_shard_param_infos", None) if getattr(p, "_is_flat_param", False) else None
    if infos is None:
        return p.numel()
    return sum(i.numel_in_shard or 0 for i in infos if i.in_shard)


def layout(
    group_params: Sequence[Sequence[torch.Tensor]], forced: bool | None, world: int = 1
) -> Layout:
    """The layout of ``group_params`` (resolved groups, in group order) on a world of ``world``.

    ``forced`` is attach's ``sharded=``. A group is sharded (its value is this rank's
    contribution) when it holds a DTensor, or in a world of several ranks: a rank cannot see
    whether the others hold the same parameters (DDP) or others (a pipeline stage, its own
    experts), so its value is the group's only if attach says so (``sharded=False``), and the
    daemon combines the ranks' values by their fingerprints. A forced sharded group without
    DTensors holds the user's own shards: every rank counts them. A forced replicated group
    counts everything: each rank's value is the group's.
    """
    flat = [p for ps in group_params for p in ps]
    owner = tuple(gi for gi, ps in enumerate(group_params) for _ in ps)
    specs = [spec_of(p) for p in flat]
    several = world > 1
    if not any(specs):
        return Layout(
            [several if forced is None else forced] * len(group_params),
            _megatron_counted(flat, owner, len(group_params)) if forced is None else None,
            owner,
            None,
        )
    has_dt = [False] * len(group_params)
    for i, spec in enumerate(specs):
        has_dt[owner[i]] = has_dt[owner[i]] or spec is not None
    sharded = [has or several if forced is None else forced for has in has_dt]
    space = _MeshSpace([spec[0] for spec in specs if spec is not None])
    counted = []
    for i, spec in enumerate(specs):
        g = owner[i]
        if not sharded[g] or not has_dt[g]:  # replicated semantics, or the user's own shards
            counted.append(True)
        elif spec is not None:
            counted.append(space.counts(*spec))
        else:
            counted.append(space.first())
    placements = tuple(None if spec is None else spec[1] for spec in specs)
    return Layout(sharded, None if all(counted) else counted, owner, placements)


def _megatron_counted(
    flat: Sequence[torch.Tensor], owner: tuple[int, ...], n_groups: int
) -> list[bool] | None:
    """Megatron-core's mask: in a group with a tensor-parallel weight, the others (the same
    on every rank of the tensor-parallel group) count at its rank 0 only. None: no mask."""
    marked = [tensor_parallel(p) for p in flat]
    if not any(marked):
        return None
    tp = megatron_tp()
    if tp is None or tp[0] == 0:
        return None
    split = [False] * n_groups
    for i, m in enumerate(marked):
        split[owner[i]] = split[owner[i]] or m
    counted = [m or not split[owner[i]] for i, m in enumerate(marked)]
    return None if all(counted) else counted


def local_grads(
    grads: Sequence[torch.Tensor | None], lay: Layout
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """The gradients as this rank holds them, and the groups (index: why) not measurable now.

    A DTensor gradient is replaced by its local tensor. One whose placements are not its
    parameter's (a ``Partial`` one above all) makes its whole group unmeasurable: every
    gradient of that group is left out (None), so the group reports no number.
    """
    cls = _dtensor_type()
    placements = lay.placements or ()
    out: list[torch.Tensor | None] = []
    bad: dict[int, str] = {}
    for i, g in enumerate(grads):
        if g is not None and cls is not None and isinstance(g, cls):
            got = g.placements
            # The mask was computed from the parameter's placements: only valid for those.
            if got != placements[i] and lay.owner[i] not in bad:
                bad[lay.owner[i]] = _why(got, placements[i])
            g = g.to_local()
        out.append(g)
    if bad:
        out = [None if lay.owner[i] in bad else g for i, g in enumerate(out)]
    return out, bad


def _why(got: tuple[Any, ...], expected: tuple[Any, ...] | None) -> str:
    if any(p.is_partial() for p in got):
        return (
            f"its gradient has placements {got}: Partial, not yet reduced over the mesh "
            f"(reduce it, e.g. redistribute to Replicate, before capture)"
        )
    return f"its gradient has placements {got}, its parameter {expected}"


class _MeshSpace:
    """The largest of the watched DTensors' meshes that holds this rank, and where it sits there."""

    def __init__(self, meshes: Sequence[Any]) -> None:
        unique = list({id(m): m for m in meshes}.values())
        inside = [m for m in unique if m.get_coordinate() is not None]
        self.root = max(inside, key=lambda m: m.size()) if inside else None  # first of the largest
        self.coord: list[int] = list(self.root.get_coordinate()) if self.root is not None else []
        self._zero: dict[int, bool] = {}

    def first(self) -> bool:
        """True on the one rank that counts a tensor replicated over the whole mesh."""
        return not any(self.coord)

    def counts(self, mesh: Any, placements: Sequence[Any]) -> bool:
        """True if this rank counts its local part of a DTensor on ``mesh`` with ``placements``."""
        coord = mesh.get_coordinate()
        if coord is None:
            return False  # not in the mesh: this rank holds none of it
        if any(p.is_replicate() and c != 0 for p, c in zip(placements, coord)):
            return False
        zero = self._zero.get(id(mesh))
        if zero is None:
            zero = self._zero[id(mesh)] = self._first_copy(mesh)
        return zero

    def _first_copy(self, mesh: Any) -> bool:
        """True when this rank's copy of ``mesh`` is at coordinate 0 of the root's other dimensions.

        The other dimensions: those of the root mesh that ``mesh`` leaves out.
        """
        if self.root is None or mesh is self.root:
            return True
        ranks = set(mesh.mesh.flatten().tolist())
        grid = self.root.mesh
        if not ranks <= set(grid.flatten().tolist()):
            return True  # not a sub-mesh of the root: nothing known beyond its own placements
        for d in range(grid.ndim):
            index: list[Any] = list(self.coord)
            index[d] = slice(None)
            line = grid[tuple(index)].tolist()  # the root's ranks along d through this rank
            if self.coord[d] != 0 and not ranks.issuperset(line):
                return False
        return True
