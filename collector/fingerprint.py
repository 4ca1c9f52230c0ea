"""What this rank counts of each group, as a fingerprint the daemon compares across ranks.

Layouts no DTensor describes (README, "Distributed"): a pipeline stage, a rank's share of
experts held as plain modules, the data-parallel copies of a tensor-parallel shard look
alike from inside one rank (plain tensors, or DTensors whose mesh leaves a dimension out),
and no collective may ask the others. So every rank says what it counts: per group, a
63-bit hash over the parameters it counts (after the placement mask, ``placement.py``),
each described by

- its name (qualified under the root model, else under the group's module, else its place
  in the group) and its shape;
- for a DTensor (or a local shard carrying ``_st_info``): its global shape, placements, mesh
  shape and this rank's coordinate along the mesh dimensions it is sharded on, so the ranks
  of one tensor-parallel shard agree and those of another differ;
- for a parameter FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``) holds as a
  1-D view of its local shard: its unsharded shape and which of its elements this rank holds
  (``flat_shards``). Two shards of one parameter often have the same shape (64 elements
  over two ranks: 32 each), and without their positions they would look like replicas;
  with them, HYBRID_SHARD replicas still agree;
- for a weight Megatron-core's tensor parallelism split (``tensor_model_parallel``): its
  ``partition_dim`` and this rank's place in the tensor-parallel group, so the parts of one
  weight differ and their data-parallel replicas agree (``placement.megatron_tp``).

Equal fingerprints on two ranks: replicas of the same elements (counted once). Different:
different elements (added). With attach's ``sharded=True`` (the user's own shards) the rank
is part of the fingerprint: every rank is its own part. Also per group, how many elements
this rank counts, which the daemon adds the same way to the group's parameter count.

A group whose ranks hold partly the same parameters and partly others (the router on every
rank beside each rank's experts, all in one host) has a fingerprint per rank, and adding
them would count the shared parameters once per rank. The fingerprint cannot show that, so
the ``Hello`` also carries a sample of each group's plain parameters: the smallest hashes of
them (bottom-k; all of them for a group of up to ``k``), from which the daemon sees two
fingerprints that share one. DTensor parameters are left out: the placement mask already
makes each rank count its own elements. ``k`` is ``MAX_PIECES_PER_GROUP``, less when many
groups share one ``Hello`` (8,192 hashes in all, about 74 KB). A shared parameter among many
private ones may fall outside both samples: sharing is found with certainty for groups of up
to ``k`` plain parameters, and for larger ones when the shared part is not a tiny fraction.

Computed when the groups re-resolve (attach, a re-binding), never per capture.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from esper_telemetry.defaults import MAX_PIECES_PER_GROUP

from .placement import Layout, held_numel, hidden_shards, megatron_tp, spec_of, tensor_parallel

__all__ = ["Holding", "holding", "names_of", "flat_shards", "PIECES_PER_HELLO"]

# At most this many parameter hashes in one Hello, all groups together (about 74 KB).
PIECES_PER_HELLO = 8192


class Holding(NamedTuple):
    """Per group (in group order): its fingerprint, the elements this rank counts, and the
    smallest hashes of the plain parameters it counts (``Hello`` carries them)."""

    fingerprints: tuple[int, ...]
    counted: tuple[int, ...]
    pieces: tuple[tuple[int, ...], ...] = ()


def names_of(root: torch.nn.Module | None, modules: Sequence[Any]) -> dict[int, str]:
    """Parameter names by ``id``: qualified under ``root`` when given, and under each of
    ``modules`` (a group's module) for what the root does not hold."""
    names: dict[int, str] = {}
    for module in modules:
        if module is not None:
            for name, p in (
                *module.named_parameters(remove_duplicate=False),
                *hidden_shards(module),
            ):
                names.setdefault(id(p), name)
    if root is not None:
        for name, p in (*root.named_parameters(remove_duplicate=False), *hidden_shards(root)):
            names[id(p)] = name  # the root's names win: the same on every rank's model
    return names


def flat_shards(modules: Sequence[Any]) -> dict[int, tuple[Any, ...]]:
    """What FSDP1 (``FullyShardedDataParallel``) shards hold on this rank, by ``id``.

    With ``use_orig_params=True`` each original parameter is a 1-D view of this rank's
    shard: its unsharded shape and the first and last index (flattened) of the elements this
    rank holds. With ``use_orig_params=False`` the module holds one ``FlatParameter`` per
    unit: which of its parameters (their places in it) it holds elements of, their
    unsharded shapes, and which elements. ``()`` where the rank holds none: left out of the
    fingerprint and the samples (ranks that both lack a parameter must not look as if they
    shared it). Empty where FSDP1 was never imported. Found only under ``modules``: a
    parameter carries no link to its wrapper."""
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    kind = getattr(fsdp, "FullyShardedDataParallel", None)
    if kind is None:
        return {}
    out: dict[int, tuple[Any, ...]] = {}
    seen: set[int] = set()
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            if not isinstance(m, kind) or id(m) in seen:
                continue
            seen.add(id(m))
            flat = getattr(getattr(m, "_handle", None), "flat_param", None)
            infos = getattr(flat, "_shard_param_infos", None)
            shapes = getattr(flat, "_shapes", None)
            if infos is None or shapes is None:
                continue
            held = [
                (i.intra_param_start_idx, i.intra_param_end_idx) if i.in_shard else None
                for i in infos
            ]
            shapes = [tuple(shape) for shape in shapes]
            params = getattr(flat, "_params", None)  # None with use_orig_params=False
            if params is None:
                pieces = tuple(
                    (i, shape, h) for i, (shape, h) in enumerate(zip(shapes, held)) if h is not None
                )
                out[id(flat)] = ("fsdp-flat", pieces) if pieces else ()
            else:
                for p, shape, h in zip(params, shapes, held):
                    out[id(p)] = ("fsdp", shape, h) if h is not None else ()
    return out


def holding(
    group_params: Sequence[Sequence[torch.Tensor]],
    lay: Layout,
    names: dict[int, str],
    rank: int,
    forced: bool | None,
    shards: dict[int, tuple[Any, ...]] | None = None,
) -> Holding:
    """The fingerprint of what this rank counts of each group, and how many elements.

    ``shards``: FSDP1's shards by parameter ``id`` (``flat_shards``)."""
    shards = shards or {}
    tp = megatron_tp()
    fingerprints = []
    counted_elements = []
    samples = []
    k = min(MAX_PIECES_PER_GROUP, max(16, PIECES_PER_HELLO // max(1, len(group_params))))
    coords: dict[int, tuple[int, ...] | None] = {}
    i = 0
    for ps in group_params:
        pieces = []
        plain = []  # hashes of the plain parameters, for the daemon's overlap check
        elements = 0
        for j, p in enumerate(ps):
            counts = lay.counted is None or lay.counted[i]
            i += 1
            if not counts:
                continue
            spec = spec_of(p)
            name = names.get(id(p), f"#{j}")
            if spec is None:
                shard = shards.get(id(p))
                if shard == ():  # FSDP1 gave this rank none of it
                    continue
                if shard is None and tp is not None and tensor_parallel(p):
                    shard = (tuple(p.shape), ("megatron-tp", p.partition_dim, *tp))
                pieces.append((name, tuple(p.shape)) if shard is None else (name, *shard))
                plain.append(_hash([pieces[-1]]))
                elements += held_numel(p)
                continue
            mesh, placements = spec
            key = id(mesh)
            if key not in coords:
                coord = mesh.get_coordinate()
                coords[key] = None if coord is None else tuple(coord)
            coord = coords[key] or ()
            shard = tuple(c for c, pl in zip(coord, placements) if pl.is_shard())
            local = p._local_tensor if hasattr(p, "_local_tensor") else p
            pieces.append(
                (
                    name,
                    tuple(_global_shape(p)),
                    tuple(str(pl) for pl in placements),
                    tuple(mesh.shape),
                    shard,
                )
            )
            elements += local.numel()
        if forced is True:
            pieces.append(("#rank", rank))  # the user's own shards: every rank its own part
        fingerprints.append(_hash(sorted(pieces, key=repr)))
        counted_elements.append(elements)
        samples.append(tuple(sorted(set(plain))[:k]) if forced is not True else ())
    return Holding(tuple(fingerprints), tuple(counted_elements), tuple(samples))


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    info = getattr(p, "_st_info", None)
    shape = getattr(info, "shape", None)
    return tuple(shape) if shape is not None else tuple(p.shape)


def _hash(pieces: list[Any]) -> int:
    digest = hashlib.blake2b(repr(pieces).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: the wire's integers
