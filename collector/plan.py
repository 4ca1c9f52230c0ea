"""The capture plan: which gradient tensors live where, grouped for one pass per device.

A plan is built from the live parameters and their gradients and reused while both stay
put. Rebuilding costs more than a capture (it inspects every tensor's device and dtype and
uploads index tensors); ``plancache`` decides when a plan still fits.

A CPU slice is also split into shares, one per thread that computes part of its norms
(``cpu_threads``): balanced by elements plus a per-tensor cost, never across a dtype bucket.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .norms import DtypeBucket
from .staging import upload

__all__ = ["Plan", "DeviceSlice", "build_plan", "grad_signature", "grad_key", "grad_presence"]

# A share of a CPU pass is worth a thread from this many tensors on: below it, the hand-off
# costs about what it saves (at 155 tensors of 50 MB in all, the pass is bound by memory
# bandwidth, and a second thread did not shorten it).
MIN_SHARE_TENSORS = 384
# What one more tensor costs ``_foreach_norm`` on the CPU, in elements read (about 1 us).
TENSOR_COST_ELEMENTS = 4096


def grad_key(grads: Sequence[Optional[torch.Tensor]]) -> Tuple[int, ...]:
    """Addresses of the gradients (0 for none): equal keys mean a plan (and graph) still fits."""
    return tuple([0 if g is None else g.data_ptr() for g in grads])


def grad_presence(grads: Sequence[Optional[torch.Tensor]]) -> Tuple[bool, ...]:
    """Which gradients exist: all a CPU plan checks per capture (one C-level pass, no per-tensor Python)."""
    return tuple(map(operator.is_not, grads, repeat(None)))


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
    # Whether positions are simply 0..n-1: the flat gradient list (and the key) as is.
    identity: bool = False
    # The pointer-table pass (esper_telemetry.collector.triton_norms), when this slice can use it: its
    # block table and its graph once captured (address-independent, so one per slice).
    table: Any = None
    table_graph: Optional[Tuple[Any, torch.Tensor]] = None
    table_uses: int = 0
    # CPU slices: the buckets cut into shares, one per thread (the first is the caller's);
    # each share is a list of (dtype, start, stop) over ``positions``.
    shares: List[List[DtypeBucket]] = field(default_factory=list)


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
    # Which gradients existed when it was built (``grad_presence``): what a CPU-only plan,
    # which no address binds, is checked by.
    present: Tuple[bool, ...] = ()


def build_plan(group_params: Sequence[Sequence[torch.Tensor]], grads: List[Optional[torch.Tensor]],
               key: Tuple[int, ...], signature: Tuple[Any, ...], sharded: List[bool],
               counts: List[int], counted: Optional[Sequence[bool]] = None,
               pointer_tables: bool = False, cpu_shares: int = 1) -> Plan:
    """Group the present gradients by device, then dtype, and upload the group index per device.

    ``grads`` are the tensors this rank holds (DTensor gradients already made local);
    ``counted`` says per flat entry whether this rank adds its squares (None: all do);
    ``cpu_shares``: at most how many threads may share the CPU slice's pass.
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
        s.identity = positions == list(range(len(grads)))
        if pointer_tables and device.type == "cuda":
            _add_table(s, [grads[i] for i in positions])  # type: ignore[misc]
        if device.type == "cpu":
            s.shares = split_shares([grads[i].numel() for i in positions], buckets, cpu_shares)  # type: ignore[union-attr]
        slices.append(s)
    plan = Plan(
        params=tuple(params), owner=owner, key=key, signature=signature, slices=slices,
        has_grad=has_grad, sharded=sharded,
        group_devices=[tuple(sorted(str(d) for d in ds)) for ds in devices],
        group_params=counts, n_groups=n_groups,
    )
    plan.known_keys[key] = None
    plan.present = grad_presence(grads)
    plan.cuda = [s for s in slices if s.device.type == "cuda"]
    plan.cpu = next((s for s in slices if s.device.type == "cpu"), None)
    if len(slices) > len(plan.cuda) + (plan.cpu is not None):
        others = sorted({str(s.device) for s in slices if s.device.type not in ("cpu", "cuda")})
        raise NotImplementedError(f"gradients on unsupported devices: {others}")
    return plan


def split_shares(numels: Sequence[int], buckets: Sequence[DtypeBucket], shares: int) -> List[List[DtypeBucket]]:
    """The buckets cut into at most ``shares`` runs of about equal cost, each a list of buckets.

    Cost: elements plus ``TENSOR_COST_ELEMENTS`` per tensor; a share gets at least
    ``MIN_SHARE_TENSORS`` tensors. Runs are contiguous in the slice's order.
    """
    shares = max(1, min(shares, len(numels) // MIN_SHARE_TENSORS))
    if shares == 1:
        return [list(buckets)]
    costs = [n + TENSOR_COST_ELEMENTS for n in numels]
    total = sum(costs)
    cuts, acc, want = [], 0, 1   # tensor indices where a new share starts
    for i, c in enumerate(costs):
        if acc >= total * want / shares and len(cuts) < shares - 1:
            cuts.append(i)
            want += 1
        acc += c
    bounds = [0, *cuts, len(numels)]
    out: List[List[DtypeBucket]] = []
    for lo, hi in zip(bounds, bounds[1:]):
        out.append([(dtype, max(start, lo), min(stop, hi)) for dtype, start, stop in buckets
                    if max(start, lo) < min(stop, hi)])
    return [share for share in out if share]


def _add_table(s: DeviceSlice, tensors: List[torch.Tensor]) -> None:
    """Give the slice a pointer table when every tensor is dense with a supported dtype."""
    from . import triton_norms

    if not triton_norms.available():
        return
    if any(t.dtype not in triton_norms.SUPPORTED or not t.is_contiguous() for t in tensors):
        return
    s.table = triton_norms.block_table([t.numel() for t in tensors], s.buckets, s.device)
