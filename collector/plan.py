"""The capture plan: which gradient tensors live where, grouped for one pass per device.

A plan is built from the live parameters and their gradients and reused while both stay
put. Rebuilding costs more than a capture (it inspects every tensor's device and dtype and
uploads index tensors); ``plancache`` decides when a plan still fits.

A CPU slice is cut into runs (``norms.CpuRun``): within each dtype, tensors of at least
``DOT_MIN_ELEMENTS`` first (a large run: float32, bfloat16 and float16 ones read in rows
of ``norms.ROW``, float64 ones by ``torch.dot``; see ``norms`` for why), then the rest. The
runs are split into shares, one per thread that computes part of the pass
(``cpu_threads``), balanced by elements plus a per-tensor cost.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch

from .norms import LARGE_DTYPES, ROWS_MIN_ELEMENTS, CpuRun, DtypeBucket
from .staging import upload

__all__ = ["Plan", "DeviceSlice", "build_plan", "grad_signature", "grad_key", "grad_presence"]

# What one more tensor costs a CPU pass, in elements read (about 1 us of dispatch).
TENSOR_COST_ELEMENTS = 4096
# A share of a CPU pass is worth a thread from this cost on (elements plus the per-tensor
# cost; about 0.3 ms of work): below it, the hand-off costs about what it saves.
MIN_SHARE_COST = 1 << 21
# CPU tensors this large make large runs (rows, or ``torch.dot`` for float64: see ``norms``);
# smaller ones share one ``_foreach_norm`` (cheaper per tensor).
DOT_MIN_ELEMENTS = ROWS_MIN_ELEMENTS
_DATA_PTR = torch.Tensor.data_ptr


def grad_key(grads: Sequence[torch.Tensor | None]) -> tuple[int, ...]:
    """Addresses of the gradients (0 for none): a plan bound to addresses fits equal keys
    (while its gradients keep their dtypes and sizes: ``plancache.still_fits``)."""
    try:
        return tuple(map(_DATA_PTR, grads))  # one C-level pass: 0.6x the time of the loop below
    except TypeError:  # a gradient is None
        return tuple([0 if g is None else g.data_ptr() for g in grads])


def grad_presence(grads: Sequence[torch.Tensor | None]) -> tuple[bool, ...]:
    """Which gradients exist: all a CPU plan checks per capture (one C-level pass, no
    per-tensor Python)."""
    return tuple(map(operator.is_not, grads, repeat(None)))


def grad_signature(grads: Sequence[torch.Tensor | None]) -> tuple[Any, ...]:
    """What a plan depends on besides addresses: each gradient's device, dtype, contiguity and
    element count (the pointer-table pass bakes the counts into its block table)."""
    return tuple(
        [None if g is None else (g.device, g.dtype, g.is_contiguous(), g.numel()) for g in grads]
    )


@dataclass
class DeviceSlice:
    """The tensors of one device, ordered by dtype, and the group each belongs to."""

    device: torch.device
    positions: list[int]  # indices into the plan's flat gradient list
    buckets: list[DtypeBucket]
    group_index: torch.Tensor  # int64, on ``device``
    slot: int  # row of the staging buffer this device fills
    # bool per tensor, on ``device``: whether this rank adds its squares (see placement);
    # None when it adds all of them, so the common case pays no extra kernel.
    counted: torch.Tensor | None = None
    # Captured CUDA graphs by the gradients' addresses (the plan's key), and how often each
    # key was seen. Several, because a job that frees gradients (zero_grad(set_to_none=True))
    # while a capture still holds the previous ones alternates between address sets.
    graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor]] = field(default_factory=dict)
    seen: dict[tuple[int, ...], int] = field(default_factory=dict)
    # CPU slices: group_index and counted as Python lists, for the completion thread's sums
    # of small passes (norms.py: fewer torch calls, each of which gives up the GIL).
    owners: list[int] = field(default_factory=list)
    counted_list: list[bool] | None = None
    # Whether positions are simply 0..n-1: the flat gradient list (and the key) as is.
    identity: bool = False
    # The pointer-table pass (esper_telemetry.collector.triton_norms), when this slice can
    # use it: its block table and its graph once captured (address-independent, so one per slice).
    table: Any = None
    table_graph: tuple[Any, torch.Tensor] | None = None
    table_uses: int = 0
    # CPU slices: the runs (see the module's docstring) cut into shares, one per thread
    # (the first is the caller's); each share is a list of runs over ``positions``.
    shares: list[list[CpuRun]] = field(default_factory=list)
    # Large tensors read in rows are among the helpers' shares: every thread reads alone
    # (``cpu_threads.one_openmp_thread``), the caller too.
    rows_alone: bool = False


@dataclass
class Plan:
    """Everything one capture needs, derived from the live groups and their gradients."""

    params: tuple[torch.Tensor, ...]  # flat over groups, in group order
    owner: list[int]  # group index of each flat entry
    key: tuple[int, ...]
    signature: tuple[Any, ...]
    slices: list[DeviceSlice]
    has_grad: list[bool]
    sharded: list[bool]
    group_devices: list[tuple[str, ...]]  # where each group's parameters live
    group_params: list[int]
    n_groups: int
    cuda: list[DeviceSlice] = field(default_factory=list)
    cpu: DeviceSlice | None = None
    # Address sets checked against this plan (esper_telemetry.collector.plancache keeps it bounded).
    known_keys: dict[tuple[int, ...], None] = field(default_factory=dict)
    # Which gradients existed when it was built (``grad_presence``): what a CPU-only plan,
    # which no address binds, is checked by.
    present: tuple[bool, ...] = ()
    # The present gradients' element counts and dtypes, in flat order: what a plan bound to
    # addresses is checked by besides them (esper_telemetry.collector.plancache.still_fits).
    numels: list[int] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)


def build_plan(
    group_params: Sequence[Sequence[torch.Tensor]],
    grads: list[torch.Tensor | None],
    key: tuple[int, ...],
    signature: tuple[Any, ...],
    sharded: list[bool],
    counts: list[int],
    counted: Sequence[bool] | None = None,
    pointer_tables: bool = False,
    cpu_shares: int = 1,
    share_rows: bool = False,
) -> Plan:
    """Group the present gradients by device, then dtype, and upload the group index per device.

    ``grads`` are the tensors this rank holds (DTensor gradients already made local);
    ``counted`` says per flat entry whether this rank adds its squares (None: all do);
    ``cpu_shares``: at most how many threads may share the CPU slice's pass;
    ``share_rows``: whether large tensors read in rows may be among them (``split_shares``).
    """
    params: list[torch.Tensor] = []
    owner: list[int] = []
    for gi, ps in enumerate(group_params):
        params.extend(ps)
        owner.extend([gi] * len(ps))
    n_groups = len(group_params)
    has_grad = [False] * n_groups
    devices: list[set] = [set() for _ in range(n_groups)]
    for gi, ps in enumerate(group_params):
        devices[gi].update(p.device for p in ps)
    by_device: dict[torch.device, dict[torch.dtype, list[int]]] = {}
    for i, g in enumerate(grads):
        if g is None:
            continue
        has_grad[owner[i]] = True
        by_device.setdefault(g.device, {}).setdefault(g.dtype, []).append(i)

    slices: list[DeviceSlice] = []
    # CPU first so its slot is stable; CUDA devices by index.
    for slot, device in enumerate(sorted(by_device, key=lambda d: (d.type != "cpu", str(d)))):
        positions: list[int] = []
        buckets: list[DtypeBucket] = []
        runs: list[CpuRun] = []
        for dtype, idx in by_device[device].items():
            start = len(positions)
            big: list[int] = []
            if device.type == "cpu":
                big = [i for i in idx if grads[i].numel() >= DOT_MIN_ELEMENTS]  # type: ignore[union-attr]
                if big:
                    chosen = set(big)
                    idx = big + [i for i in idx if i not in chosen]
                    runs.append((dtype, start, start + len(big), dtype in LARGE_DTYPES))
            if len(idx) > len(big):
                runs.append((dtype, start + len(big), start + len(idx), False))
            buckets.append((dtype, start, start + len(idx)))
            positions.extend(idx)
        index = upload(torch.tensor([owner[i] for i in positions], dtype=torch.int64), device)
        flags = None if counted is None else [counted[i] for i in positions]
        mask = (
            None
            if flags is None or all(flags)
            else upload(torch.tensor(flags, dtype=torch.bool), device)
        )
        s = DeviceSlice(device, positions, buckets, index, slot, mask)
        s.identity = positions == list(range(len(grads)))
        if pointer_tables and device.type == "cuda":
            _add_table(s, [grads[i] for i in positions])  # type: ignore[misc]
        if device.type == "cpu":
            s.owners = [owner[i] for i in positions]
            s.counted_list = None if mask is None else flags
            s.shares = split_shares(
                [grads[i].numel() for i in positions],  # type: ignore[union-attr]
                runs,
                cpu_shares,
                share_rows,
            )
            s.rows_alone = any(map(_read_in_rows, (run for share in s.shares[1:] for run in share)))
        slices.append(s)
    plan = Plan(
        params=tuple(params),
        owner=owner,
        key=key,
        signature=signature,
        slices=slices,
        has_grad=has_grad,
        sharded=sharded,
        group_devices=[tuple(sorted(str(d) for d in ds)) for ds in devices],
        group_params=counts,
        n_groups=n_groups,
    )
    plan.known_keys[key] = None
    plan.present = grad_presence(grads)
    plan.cuda = [s for s in slices if s.device.type == "cuda"]
    plan.cpu = next((s for s in slices if s.device.type == "cpu"), None)
    if len(slices) > len(plan.cuda) + (plan.cpu is not None):
        others = sorted({str(s.device) for s in slices if s.device.type not in ("cpu", "cuda")})
        raise NotImplementedError(f"gradients on unsupported devices: {others}")
    return plan


def split_shares(
    numels: Sequence[int], runs: Sequence[CpuRun], shares: int, share_rows: bool = False
) -> list[list[CpuRun]]:
    """The runs cut into at most ``shares`` shares of about equal cost; the first is the caller's.

    Runs of tensors of ``DOT_MIN_ELEMENTS`` or more stay in the first share: torch spreads
    their row reductions (and MKL a float64 ``dot``) over OpenMP threads, which, started
    again from a second calling thread, fight the first one's (a pass took 3 to 7 times as
    long); those spread over the cores by themselves (counted here at half their
    elements). With ``share_rows`` (``shares`` threads, one a core, each able to read on one
    OpenMP thread: ``cpu_threads.one_openmp_thread``) runs read in rows are cut between the
    shares too, if there is a share's worth for every thread (on fewer, cores would sit idle
    that torch's threads would have read with); float64 ones (MKL's ``dot``) stay in the
    first, counted whole. Runs of smaller tensors (``_foreach_norm``, below torch's grain
    size) are cut between the shares. Cost: elements plus ``TENSOR_COST_ELEMENTS`` per
    tensor; each share costs at least ``MIN_SHARE_COST``; a cut falls at the tensor whose
    middle is nearest the share's end.
    """
    if share_rows:
        cut = _split(numels, runs, shares, True)
        if len(cut) == shares:
            return cut
    return _split(numels, runs, shares, False)


def _read_in_rows(run: CpuRun) -> bool:
    return run[3] and run[0] != torch.float64


def _split(
    numels: Sequence[int], runs: Sequence[CpuRun], shares: int, rows: bool
) -> list[list[CpuRun]]:
    """``split_shares``, with runs read in rows cut between the shares (``rows``) or not."""
    dots = [
        run
        for run in runs
        if (run[3] or numels[run[1]] >= DOT_MIN_ELEMENTS) and not (rows and _read_in_rows(run))
    ]
    small = [(i, run) for run in runs if run not in dots for i in range(run[1], run[2])]
    fixed = sum(
        numels[i] // (2 if run[3] and not rows else 1) + TENSOR_COST_ELEMENTS
        for run in dots
        for i in range(run[1], run[2])
    )
    costs = [numels[i] + TENSOR_COST_ELEMENTS for i, _ in small]
    total = fixed + sum(costs)
    shares = max(1, min(shares, total // MIN_SHARE_COST))
    if shares == 1 or not small:
        return [list(runs)]
    cuts, acc, want = [], fixed, 1  # indices into ``small`` where a new share starts
    for k, c in enumerate(costs):
        if acc + c / 2 >= total * want / shares and len(cuts) < shares - 1:
            cuts.append(k)
            want += 1
        acc += c
    bounds = [0, *cuts, len(small)]
    out: list[list[CpuRun]] = []
    for n, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        share: list[CpuRun] = list(dots) if n == 0 else []
        for i, run in small[lo:hi]:  # consecutive tensors of one run make one run again
            last = share[-1] if share else None
            if last is not None and last[2] == i and (last[0], last[3]) == (run[0], run[3]):
                share[-1] = (run[0], last[1], i + 1, run[3])
            else:
                share.append((run[0], i, i + 1, run[3]))
        out.append(share)
    return [share for share in out if share]


def _add_table(s: DeviceSlice, tensors: list[torch.Tensor]) -> None:
    """Give the slice a pointer table when every tensor is dense with a supported dtype."""
    from . import triton_norms

    if not triton_norms.available():
        return
    if any(t.dtype not in triton_norms.SUPPORTED or not t.is_contiguous() for t in tensors):
        return
    s.table = triton_norms.block_table([t.numel() for t in tensors], s.buckets, s.device)
