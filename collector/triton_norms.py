"""A pointer-table norm kernel: per-tensor sums of squares in one launch per dtype.

Why: ``_foreach_norm`` costs hundreds of microseconds of host time per call (it inspects
and launches over every tensor), and a CUDA graph of it is only valid while every gradient
keeps its address, which jobs that free gradients each step (``zero_grad(set_to_none=True)``)
never guarantee. Here the gradients' addresses are *data*: a small int64 table copied to
the device before each pass. Everything else (the block layout, derived from the tensors'
sizes) is fixed per plan, so the whole pass is captured once as a CUDA graph and replayed
whatever the addresses are.

Block ``b`` reads ``BLOCK`` elements of tensor ``block_tensor[b]`` from offset
``block_start[b]`` and writes their sum of squares (accumulated in float32) to
``out[b]``; per-tensor sums follow by ``index_add_``. Only used for dense float32, bfloat16
and float16 gradients on CUDA, when Triton is importable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .staging import upload

__all__ = ["available", "BlockTable", "block_table", "tensor_squares"]

BLOCK = 4096

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = None

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _block_squares(
        ptrs, numels, block_tensor, block_start, out, BLOCK: tl.constexpr, DTYPE: tl.constexpr
    ):
        b = tl.program_id(0)
        t = tl.load(block_tensor + b)
        start = tl.load(block_start + b)
        n = tl.load(numels + t)
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out + b, tl.sum(x * x, axis=0))

    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class BlockTable:
    """The fixed part of one device's pass: sizes, blocks, and where the addresses go."""

    __slots__ = ("numels", "buckets", "ptrs")

    def __init__(
        self,
        numels: torch.Tensor,
        buckets: list[tuple[torch.dtype, torch.Tensor, torch.Tensor]],
        ptrs: torch.Tensor,
    ) -> None:
        self.numels = numels  # int64 per tensor
        self.buckets = buckets  # (dtype, block_tensor int64, block_start int64) per dtype
        self.ptrs = ptrs  # int64 per tensor, refreshed before every pass


def block_table(
    numels: Sequence[int], buckets: Sequence[tuple[torch.dtype, int, int]], device: torch.device
) -> BlockTable:
    """Blocks for tensors of these sizes, per dtype bucket ``(dtype, start, stop)``."""
    sizes = torch.tensor(list(numels), dtype=torch.int64)
    per_tensor = (sizes + BLOCK - 1) // BLOCK
    out = []
    for dtype, start, stop in buckets:
        counts = per_tensor[start:stop]
        tensor_ids = torch.repeat_interleave(torch.arange(start, stop, dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts  # first block of each tensor
        within = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(
            first, counts
        )
        out.append((dtype, upload(tensor_ids, device), upload(within * BLOCK, device)))
    ptrs = torch.zeros(len(sizes), dtype=torch.int64, device=device)
    return BlockTable(upload(sizes, device), out, ptrs)


def tensor_squares(table: BlockTable) -> torch.Tensor:
    """Per-tensor sums of squares (float64) of the tensors whose addresses are in ``table.ptrs``.

    Runs on the current stream; launches one Triton kernel per dtype bucket and one
    ``index_add_`` each. Capturable in a CUDA graph (the addresses are read from memory).
    """
    n = table.numels.shape[0]
    sums = torch.zeros(n, dtype=torch.float64, device=table.ptrs.device)
    for dtype, block_tensor, block_start in table.buckets:
        blocks = block_tensor.shape[0]
        if blocks == 0:
            continue
        partial = torch.empty(blocks, dtype=torch.float32, device=sums.device)
        _block_squares[(blocks,)](
            table.ptrs,
            table.numels,
            block_tensor,
            block_start,
            partial,
            BLOCK=BLOCK,
            DTYPE=_TL_DTYPE[dtype],
            num_warps=8,
        )
        sums.index_add_(0, block_tensor, partial.to(torch.float64))
    return sums
