"""The capture plan: which gradient tensors live where, grouped for one pass per device.

A plan is built from the live parameters and their gradients and reused while both stay
put. Rebuilding costs more than a capture (it inspects every tensor's device and dtype and
uploads index tensors); ``plancache`` decides when a plan still fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .norms import DtypeBucket
from .staging import upload

__all__ = ["Plan", "DeviceSlice", "build_plan", "grad_signature", "grad_key"]


def grad_key(grads: Sequence[Optional[torch.Tensor]]) -> Tuple[int, ...]:
    """Addresses of the gradients (0 for none): equal keys mean a plan (and graph) still fits."""
    return tuple([0 if g is None else g.data_ptr() for g in grads])


def grad_signature(grads: Sequence[Optional[torch.Tensor]]) -> Tuple[Any, ...]:
    """What a plan depends on besides addresses: each gradient's device, dtype and contiguity."""
    return tuple([None if g is None else (g.device, g.dtype, g.is_contiguous()) for g in grads])


@dataclass
class DeviceSlice:
    """The tensors of one device, ordered by dtype, and the group each belongs to."""

    device: torch.device
    positions: List[int]            # indices into the plan's flat gradient list
    buckets: List[DtypeBucket]
    group_index: torch.Tensor       # int64, on ``device``
    slot: int                       # row of the staging buffer this device fills
    # bool per tensor, on ``device``: whether this rank adds its squares (see placement);
    # None when it adds all of them, so the common case pays no extra kernel.
    counted: Optional[torch.Tensor] = None
    # Captured CUDA graphs by the gradients' addresses (the plan's key), and how often each
    # key was seen. Several, because a job that frees gradients (zero_grad(set_to_none=True))
    # while a capture still holds the previous ones alternates between address sets.
    graphs: Dict[Tuple[int, ...], Tuple[Any, torch.Tensor]] = field(default_factory=dict)
    seen: Dict[Tuple[int, ...], int] = field(default_factory=dict)
    # The pointer-table pass (esper_telemetry.collector.triton_norms), when this slice can use it: its
    # block table, whether positions are simply 0..n-1 (the key is then the table as is),
    # and its graph once captured (address-independent, so one per slice).
    table: Any = None
    identity: bool = False
    table_graph: Optional[Tuple[Any, torch.Tensor]] = None
    table_uses: int = 0


@dataclass
class Plan:
    """Everything one capture needs, derived from the live groups and their gradients."""

    params: Tuple[torch.Tensor, ...]          # flat over groups, in group order
    owner: List[int]                          # group index of each flat entry
    key: Tuple[int, ...]
    signature: Tuple[Any, ...]
    slices: List[DeviceSlice]
    has_grad: List[bool]
    sharded: List[bool]
    group_devices: List[Tuple[str, ...]]   # where each group's parameters live
    group_params: List[int]
    n_groups: int
    cuda: List[DeviceSlice] = field(default_factory=list)
    cpu: Optional[DeviceSlice] = None
    # Address sets checked against this plan (esper_telemetry.collector.plancache keeps it bounded).
    known_keys: Dict[Tuple[int, ...], None] = field(default_factory=dict)


def build_plan(group_params: Sequence[Sequence[torch.Tensor]], grads: List[Optional[torch.Tensor]],
               key: Tuple[int, ...], signature: Tuple[Any, ...], sharded: List[bool],
               counts: List[int], counted: Optional[Sequence[bool]] = None,
               pointer_tables: bool = False) -> Plan:
    """Group the present gradients by device, then dtype, and upload the group index per device.

    ``grads`` are the tensors this rank holds (DTensor gradients already made local);
    ``counted`` says per flat entry whether this rank adds its squares (None: all do).
    """
    params: List[torch.Tensor] = []
    owner: List[int] = []
    for gi, ps in enumerate(group_params):
        params.extend(ps)
        owner.extend([gi] * len(ps))
    n_groups = len(group_params)
    has_grad = [False] * n_groups
    devices: List[set] = [set() for _ in range(n_groups)]
    for gi, ps in enumerate(group_params):
        devices[gi].update(p.device for p in ps)
    by_device: Dict[torch.device, Dict[torch.dtype, List[int]]] = {}
    for i, g in enumerate(grads):
        if g is None:
            continue
        has_grad[owner[i]] = True
        by_device.setdefault(g.device, {}).setdefault(g.dtype, []).append(i)

    slices: List[DeviceSlice] = []
    # CPU first so its slot is stable; CUDA devices by index.
    for slot, device in enumerate(sorted(by_device, key=lambda d: (d.type != "cpu", str(d)))):
        positions: List[int] = []
        buckets: List[DtypeBucket] = []
        for dtype, idx in by_device[device].items():
            buckets.append((dtype, len(positions), len(positions) + len(idx)))
            positions.extend(idx)
        index = upload(torch.tensor([owner[i] for i in positions], dtype=torch.int64), device)
        flags = None if counted is None else [counted[i] for i in positions]
        mask = None if flags is None or all(flags) else upload(torch.tensor(flags, dtype=torch.bool), device)
        s = DeviceSlice(device, positions, buckets, index, slot, mask)
        if pointer_tables and device.type == "cuda":
            _add_table(s, [grads[i] for i in positions], len(grads))  # type: ignore[misc]
        slices.append(s)
    plan = Plan(
        params=tuple(params), owner=owner, key=key, signature=signature, slices=slices,
        has_grad=has_grad, sharded=sharded,
        group_devices=[tuple(sorted(str(d) for d in ds)) for ds in devices],
        group_params=counts, n_groups=n_groups,
    )
    plan.known_keys[key] = None
    plan.cuda = [s for s in slices if s.device.type == "cuda"]
    plan.cpu = next((s for s in slices if s.device.type == "cpu"), None)
    if len(slices) > len(plan.cuda) + (plan.cpu is not None):
        others = sorted({str(s.device) for s in slices if s.device.type not in ("cpu", "cuda")})
        raise NotImplementedError(f"gradients on unsupported devices: {others}")
    return plan


def _add_table(s: DeviceSlice, tensors: List[torch.Tensor], n_flat: int) -> None:
    """Give the slice a pointer table when every tensor is dense with a supported dtype."""
    from . import triton_norms

    if not triton_norms.available():
        return
    if any(t.dtype not in triton_norms.SUPPORTED or not t.is_contiguous() for t in tensors):
        return
    s.table = triton_norms.block_table([t.numel() for t in tensors], s.buckets, s.device)
    s.identity = s.positions == list(range(n_flat))
