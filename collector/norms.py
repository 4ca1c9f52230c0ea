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
the ``(2, n_groups)`` result from what it read (``squares``, then ``group_sums``).

Accuracy (``sq_error_bound``): a float32 sum of positive terms is off by at most ``d u``
relative (``u = 2**-24``) where ``d`` bounds the additions any term goes through, and
that depends on the order the kernel picks: BLAS ``sdot`` sums in an order of its own, not
the same on Intel and AMD (MKL's float32 ``dot`` was 1.2e-5 off at 32,768 equal entries on
an AMD EPYC, 2e-4 at a million), so nothing short of ``d = n`` can be said of it. A CPU
tensor of ``ROWS_MIN_ELEMENTS`` or more (a *large run*) is read in rows of ``ROW``
elements instead, by torch's own row kernel (``_rows_squares``), whose order is known: a
row's squares go to ``W`` partial sums, one per SIMD lane, then folded one after the
other, so ``d <= ROW / W + W``; ``W`` is 8 with AVX2 or without SIMD, 16 with AVX-512,
and ``ROW_LANES = 4`` (NEON) is the fewest the bound assumes. The rows' norms meet in
float64. Float64 tensors keep ``torch.dot`` (float64, ``d = n`` is no worry). Smaller
tensors take one ``_foreach_norm`` each (the same kernel on one row of ``n``).
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "accumulation_dtype",
    "partials",
    "tensor_squares",
    "squares",
    "group_sums",
    "group_sums_list",
    "sq_error_bound",
    "ROW",
    "ROW_LANES",
    "ROWS_MIN_ELEMENTS",
    "LARGE_DTYPES",
    "DtypeBucket",
    "CpuRun",
    "Part",
]

log = logging.getLogger("esper_telemetry.collector")

# (dtype, start, stop): tensors[start:stop] all have this dtype.
DtypeBucket = tuple[torch.dtype, int, int]
# (dtype, start, stop, large): a CPU run, squares by rows (a float64 one: torch.dot) when
# large, else one _foreach_norm.
CpuRun = tuple[torch.dtype, int, int, bool]


# (start, values, squared): what a CPU run computed for tensors[start:start + len(values)].
Part = tuple[int, torch.Tensor, bool]
_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_NUMEL = torch.Tensor.numel
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
# The compiled row pass raised once (its error): ``_rows`` runs as Python from then on.
_SCRIPT_FAILED: list[Exception] = []
_COMPILE_LOCK = threading.Lock()

# CPU tensors this large make large runs (plan.py); their rows have ROW elements, each
# summed in at least ROW_LANES partial sums by torch's row kernel (see the docstring).
ROWS_MIN_ELEMENTS = 1 << 15
ROW = 512
ROW_LANES = 4
# Dtypes a large run reads in rows (float32 squares of them are exact), and float64 (dot).
LARGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_U32 = 2.0**-24
_U64 = 2.0**-53


def sq_error_bound(numel: int, dtype: torch.dtype) -> float:
    """How far, relative, the CPU pass's sum of squares of one such tensor may be from the
    exact one, on any CPU (without underflow or overflow).

    Positive terms that each go through at most ``d`` float32 additions sum to within
    ``gamma_d = d u / (1 - d u)`` of the exact sum. A large run's row: the products (one
    rounding), ``ROW / ROW_LANES + ROW_LANES - 1`` additions (lanes, then their fold), the
    square root (twice its rounding in the square), the norm squared in float32 (one
    more); then float64 for the rest (the rows and up to ``ROW - 1`` tail entries: ``k +
    ROW`` roundings of ``2**-53``). ``_foreach_norm``: the same kernel on one row of
    ``numel``, bounded here without its lanes (``numel + 2``: it is not what keeps the README's
    figures). Float64: ``numel + 1`` roundings of ``2**-53``. A group's figure adds its
    tensors' in float64: its bound is the largest of theirs, plus ``2**-53`` per tensor.
    """
    if dtype == torch.float64:
        return _gamma(numel + 1, _U64)
    if numel >= ROWS_MIN_ELEMENTS and dtype in LARGE_DTYPES:
        depth = ROW // ROW_LANES + ROW_LANES + 3
        return _gamma(depth, _U32) + _gamma(numel // ROW + ROW, _U64)
    return _gamma(numel + 2, _U32) + _U64


def _gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u) if k * u < 0.5 else math.inf


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
    """Per CPU tensor its sum of squares (large runs) or its 2-norm (the others), per run:
    ``(start, values, squared)``; ``squares`` makes them one float64 tensor of squares.

    A large run reads each tensor in rows (``_rows_squares``; a float64 one: ``torch.dot``
    of it with itself); another run takes one ``_foreach_norm`` accumulated as
    ``accumulation_dtype`` of its dtype. It raises, rather than computing another figure,
    when a tensor no longer is what its run says in a way that would change it: another
    dtype in a large run, a float64 tensor in a run accumulated in float32
    (``_foreach_norm`` refuses to narrow), or a tensor not on the CPU (checked before a
    large run reads anything; ``stack`` refuses mixed devices, and all on another device is
    checked here, before anything could wait for it). Every other dtype accumulates in
    float32 either way.
    """
    out: list[Part] = []
    whole = len(tensors)
    with torch.inference_mode():  # no autograd dispatch per tensor: 8% of _foreach_norm at 2,000
        for dtype, start, stop, large in runs:
            out.append(
                _run_squares(
                    tensors if start == 0 and stop == whole else tensors[start:stop],
                    dtype,
                    start,
                    large,
                )
            )
    return out


def _run_squares(part: Sequence[torch.Tensor], dtype: torch.dtype, start: int, large: bool) -> Part:
    if large:
        if set(map(_DTYPE, part)) != {dtype}:
            raise RuntimeError(f"gradients of another dtype than {dtype} in a large-tensor run")
        if not all(map(_IS_CPU, part)):
            raise RuntimeError("gradients on another device than the CPU in a CPU pass")
        if dtype == torch.float64:
            flat = list(map(torch.flatten, part))
            values = torch.stack(list(map(torch.dot, flat, flat)))
        else:
            values = _rows_squares(part)
    else:
        values = torch.stack(torch._foreach_norm(part, 2, dtype=accumulation_dtype(dtype)))
    if not values.is_cpu:
        raise RuntimeError(f"gradients on {values.device} in a CPU pass")
    return start, values, large


def _rows_squares(part: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float64 sums of squares of CPU tensors, read in rows of ``ROW`` elements.

    Each tensor's first ``k * ROW`` elements, viewed as ``k`` rows of ``ROW``, get their
    2-norms from one ``vector_norm`` over the rows (torch's row kernel: see the module's
    docstring; spread over torch's threads like any large reduction); its last
    ``numel % ROW`` elements (the tail) are taken as they are (``_rows``). This runs on the
    training thread: handed to the completion thread, these ops started an OpenMP team of
    its own there, whose spinning workers then slowed the next capture's (about 2x).
    bfloat16/float16 tensors are read as float32 copies (their squares are exact in float32).
    At 512 elements a row the row kernel reads as fast as a float32 ``torch.dot`` on one core.
    """
    if part[0].dtype != torch.float32:
        part = [t.float() for t in part]
    if not all(map(_IS_CONTIGUOUS, part)):
        part = [t.contiguous() for t in part]
    rows = _Rows.of(tuple(map(_NUMEL, part)))
    compiled = None if _SCRIPT_FAILED else _compiled_rows()
    if compiled is not None:
        try:
            return compiled(part, rows.ks, ROW, rows.counts, rows.tails)
        except Exception as exc:  # TorchScript's own failure: the same figures in Python
            if not _SCRIPT_FAILED:
                _SCRIPT_FAILED.append(exc)
                log.warning(
                    "esper-telemetry: the TorchScript CPU row pass failed (%s); "
                    "it runs in Python from now on",
                    exc,
                )
    return _rows(part, rows.ks, ROW, rows.counts, rows.tails)


def _rows(
    part: list[torch.Tensor],
    ks: list[int],
    row: int,
    counts: torch.Tensor,
    tails: torch.Tensor | None,
) -> torch.Tensor:
    """``_rows_squares``' loop, written so that TorchScript compiles it (``_compiled_rows``).

    ``part``: float32 contiguous CPU tensors of any shape; ``ks[i]`` rows of ``row`` in ``part[i]``;
    ``counts`` the same as an int64 tensor, ``tails`` the tails' lengths (None: no tensor
    has one). The row norms of every tensor make one float32 tensor, the tails another
    (two ``cat``: one over both, interleaved, cost 0.5 ms at 155 tensors, these two 0.1);
    each is squared there (an overflow is an Inf, as in a float32 sum), then summed per
    tensor in float64 (``segment_reduce``; a tensor without a tail has an empty segment, a
    zero).
    """
    norms: list[torch.Tensor] = []
    ends: list[torch.Tensor] = []
    for t, k in zip(part, ks):
        # Views from the tensor's own storage offset (views into one flat buffer), whatever
        # its shape (it is contiguous).
        at = t.storage_offset()
        norms.append(torch.linalg.vector_norm(t.as_strided([k, row], [row, 1], at), 2.0, [1]))
        if tails is not None:
            ends.append(t.as_strided([t.numel() - k * row], [1], at + k * row))
    sums = torch.segment_reduce(torch.cat(norms).square_().double(), "sum", lengths=counts)
    if tails is not None:
        sums += torch.segment_reduce(torch.cat(ends).square_().double(), "sum", lengths=tails)
    return sums


def _compiled_rows() -> Callable[..., torch.Tensor] | None:
    """``_rows`` compiled by TorchScript, or None where it cannot be (then ``_rows`` runs as
    Python: the same ops, the same figures). One thread compiles, the others wait for it:
    ``warnings.catch_warnings`` swaps the process's filter list, and two threads in it at
    once can leave the user's warnings off for good (the training thread and a helper both
    met the first capture)."""
    with _COMPILE_LOCK:
        return _compile_rows()


@functools.cache
def _compile_rows() -> Callable[..., torch.Tensor] | None:
    """``_compiled_rows``, once.

    Why: a pass over large tensors makes three torch calls a tensor (the view of its rows,
    their norms, its tail), and from Python each costs 3-6 us of argument parsing and
    dispatch, about 1.5 ms at 155 tensors, a quarter of the pass; TorchScript's interpreter
    makes the same calls from C++, without the GIL (measured on a 2-core AMD EPYC: 155
    tensors of 84,562, the pass 0.88x of the original monitor's against 1.07x in Python).
    Compiled on first use (about 10 ms), and the first call or two run TorchScript's
    profiling (about 50 ms, once a process). ``torch.jit.script`` is deprecated: its warning
    is not the user's concern, and if a later torch drops it, ``_rows`` runs as Python.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.jit.script(_rows)
    except Exception as exc:
        log.info("esper-telemetry: CPU row pass in Python, TorchScript unavailable: %s", exc)
        return None
    # Under PYTORCH_JIT=0 torch.jit.script hands back the function itself.
    return compiled if isinstance(compiled, torch.jit.ScriptFunction) else None


class _Rows:
    """How ``_rows_squares`` reads tensors of these sizes: per tensor how many rows of
    ``ROW`` it has (``ks``, and as an int64 tensor ``counts``) and its tail's length (an
    int64 tensor; None: no tensor has one). The same sizes come back at every capture while
    the gradients keep their shapes."""

    __slots__ = ("ks", "counts", "tails")

    def __init__(self, numels: tuple[int, ...]) -> None:
        self.ks = [n // ROW for n in numels]
        tails = [n - k * ROW for n, k in zip(numels, self.ks)]
        self.counts = torch.tensor(self.ks)
        self.tails = torch.tensor(tails) if any(tails) else None

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def of(numels: tuple[int, ...]) -> _Rows:
        return _Rows(numels)


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
