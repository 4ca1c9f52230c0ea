"""Per-group sums of squared gradient entries and non-finite tensor counts, on one device.

Reads like ``torch/nn/utils/clip_grad.py``: the caller has already grouped the tensors by
dtype; one ``_foreach_norm`` per dtype, results stay on the device, and there is no Python
branch on a tensor value (such a branch is a hidden host synchronization).

The result is one float64 tensor of shape ``(2, n_groups)``: row 0 the sums of squares,
row 1 how many tensors of the group hold a NaN or an Inf. A tensor counts as non-finite when
its norm is (NaN/Inf entries, or a sum of squares past the accumulation type's range).

``counted`` (a bool per tensor, on the device; None: all) leaves tensors out of row 0 that
another rank counts (``placement``: each element once over the world); row 1 still counts
every tensor this rank holds.

On the CPU the training thread only reads the gradients (``tensor_squares``, per run of
the plan, possibly on helper threads: ``cpu_threads``), and the completion thread makes
the ``(2, n_groups)`` result from what it read (``squares``, then ``group_sums``). Large
float32/float64 tensors take ``torch.dot`` there: faster than ``_foreach_norm`` on the
CPU, and its float32 error is about a tenth of it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

__all__ = [
    "accumulation_dtype",
    "partials",
    "tensor_squares",
    "squares",
    "group_sums",
    "group_sums_list",
    "DtypeBucket",
    "CpuRun",
    "Part",
]

# (dtype, start, stop): tensors[start:stop] all have this dtype.
DtypeBucket = tuple[torch.dtype, int, int]
# (dtype, start, stop, dot): a CPU run, squares by torch.dot (True) or _foreach_norm.
CpuRun = tuple[torch.dtype, int, int, bool]
# (start, values, squared): what a CPU run computed for tensors[start:start + len(values)].
Part = tuple[int, torch.Tensor, bool]
_DTYPE = operator.attrgetter("dtype")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16, fp8) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def partials(
    tensors: Sequence[torch.Tensor],
    buckets: Sequence[DtypeBucket],
    group_index: torch.Tensor,
    n_groups: int,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum squares and count non-finite tensors per group, for tensors on one device.

    ``group_index[i]`` is the group of ``tensors[i]`` (an int64 tensor on the same device);
    ``buckets`` cover ``tensors`` in order. Runs on whatever stream is current.
    """
    norms: list[torch.Tensor] = []
    for dtype, start, stop in buckets:
        norms.extend(torch._foreach_norm(tensors[start:stop], 2, dtype=accumulation_dtype(dtype)))
    stacked = (
        torch.stack([n.to(torch.float64) for n in norms])
        if len(buckets) > 1
        else torch.stack(norms).to(torch.float64)
    )
    return group_sums(stacked * stacked, group_index, n_groups, counted)


def tensor_squares(tensors: Sequence[torch.Tensor], runs: Sequence[CpuRun]) -> list[Part]:
    """Per CPU tensor its sum of squares (``dot`` runs) or its 2-norm (the others), per run:
    ``(start, values, squared)``; ``squares`` makes them one float64 tensor of squares.

    A ``dot`` run takes ``torch.dot`` of each flattened tensor with itself (float32 or
    float64, as the run's dtype); another run one ``_foreach_norm`` accumulated as
    ``accumulation_dtype`` of its dtype. It raises, rather than computing another figure,
    when a tensor no longer is what its run says in a way that would change it: another
    dtype in a ``dot`` run, a float64 tensor in a run accumulated in float32
    (``_foreach_norm`` refuses to narrow), or a tensor not on the CPU (``stack`` refuses
    mixed devices; all on another device is checked here, before anything could wait for
    it). Every other dtype accumulates in float32 either way.
    """
    out: list[Part] = []
    whole = len(tensors)
    with torch.inference_mode():  # no autograd dispatch per tensor: 8% of _foreach_norm at 2,000
        for dtype, start, stop, dot in runs:
            out.append(
                _run_squares(
                    tensors if start == 0 and stop == whole else tensors[start:stop],
                    dtype,
                    start,
                    dot,
                )
            )
    return out


def _run_squares(part: Sequence[torch.Tensor], dtype: torch.dtype, start: int, dot: bool) -> Part:
    if dot:
        if set(map(_DTYPE, part)) != {dtype}:
            raise RuntimeError(f"gradients of another dtype than {dtype} in a torch.dot run")
        flat = list(map(torch.flatten, part))
        values = torch.stack(list(map(torch.dot, flat, flat)))
    else:
        values = torch.stack(torch._foreach_norm(part, 2, dtype=accumulation_dtype(dtype)))
    if not values.is_cpu:
        raise RuntimeError(f"gradients on {values.device} in a CPU pass")
    return start, values, dot


def squares(parts: Sequence[Part]) -> torch.Tensor:
    """``tensor_squares``' parts (any order) as one float64 tensor of squares, in tensor order
    (exact: a float32 squared fits)."""
    cols = [
        v.to(torch.float64) if squared else v.to(torch.float64).square()
        for _, v, squared in sorted(parts, key=lambda part: part[0])
    ]
    return cols[0] if len(cols) == 1 else torch.cat(cols)


def group_sums(
    squares: torch.Tensor,
    group_index: torch.Tensor,
    n_groups: int,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """From per-tensor float64 sums of squares to the ``(2, n_groups)`` result."""
    out = torch.zeros((2, n_groups), dtype=torch.float64, device=squares.device)
    out[1].index_add_(0, group_index, (~torch.isfinite(squares)).to(torch.float64))
    if counted is not None:
        # where, not a product: an Inf left out times 0 would be a NaN counted in.
        squares = torch.where(counted, squares, 0.0)
    out[0].index_add_(0, group_index, squares)
    return out


def group_sums_list(
    parts: Sequence[Part],
    owners: Sequence[int],
    n_groups: int,
    counted: Sequence[bool] | None = None,
) -> list[list[float]]:
    """``group_sums(squares(parts), ...)`` in Python floats, for small passes: one ``tolist``
    per part instead of about ten torch calls, each of which gives up the GIL and, beside a
    busy training thread, waits to get it back. The same float64 figures, added in the same
    order (a float32 norm squared in float64 is exact either way)."""
    values: list[float] = []
    for _, v, squared in sorted(parts, key=lambda part: part[0]):
        got = v.tolist()
        values.extend(got if squared else [x * x for x in got])
    sums = [0.0] * n_groups
    bad = [0.0] * n_groups
    isfinite = math.isfinite
    for i, (x, g) in enumerate(zip(values, owners)):
        if not isfinite(x):
            bad[g] += 1.0
        if counted is None or counted[i]:
            sums[g] += x
    return [sums, bad]
