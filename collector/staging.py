"""Pinned host buffers for captures in flight, reused only after their capture completed.

Each capture needs host memory the GPU writes into (the per-device result rows) and, for
pointer-table passes, host memory the GPU reads from (the gradients' addresses). Both must
be pinned for the copies to be asynchronous, and neither may be touched again until the
capture's device work is done: the completion thread gives a capture's buffers back only
after its events completed. Pooling them also keeps ``cudaHostAlloc`` (slow, and
serializing) off the training thread once the pool is warm.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["Staging", "StagingPool", "upload"]


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without the host waiting: a CPU device gets it as is.

    A pageable host-to-device copy synchronizes; a pinned, non-blocking one does not (the
    caching host allocator keeps the pinned copy alive until the transfer is done).
    """
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class Staging:
    """One capture's buffers: ``rows`` (devices, 2, groups) float64; ``ptrs`` per CUDA slice;
    ``amp``, GradScaler's (found_inf, scale) as float64, made on first use (see ``amp_pair``)."""

    __slots__ = ("rows", "ptrs", "shape", "amp")

    def __init__(self, rows: torch.Tensor, ptrs: dict[int, torch.Tensor], shape: tuple) -> None:
        self.rows = rows
        self.ptrs = ptrs
        self.shape = shape
        self.amp: torch.Tensor | None = None

    def amp_pair(self) -> torch.Tensor:
        """Pinned host memory for GradScaler's pair (a CUDA copy's target); kept with this staging.

        Pooled rather than allocated per capture: freeing pinned memory that a copy used
        records a CUDA event on that copy's stream, and the completion thread, which drops a
        capture, must not make such calls into a stream a user may be capturing.
        """
        if self.amp is None:
            self.amp = torch.zeros(2, dtype=torch.float64, pin_memory=True)
        return self.amp


class StagingPool:
    """Thread-safe free lists of ``Staging`` by shape; ``take`` on the training thread,
    ``give`` anywhere."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[Staging]] = {}
        self._lock = threading.Lock()

    def take(self, plan) -> Staging:
        tables = tuple(
            (s.slot, int(s.table.numels.shape[0])) for s in plan.cuda if s.table is not None
        )
        pin = bool(plan.cuda)
        # Pinning is part of the key: a pageable buffer left by a CPU plan would turn this
        # plan's non-blocking device-to-host copy into a synchronous one.
        shape = (pin, len(plan.slices), plan.n_groups, tables)
        with self._lock:
            free = self._free.get(shape)
            if free:
                return free.pop()
        rows = torch.zeros(
            (len(plan.slices), 2, plan.n_groups), dtype=torch.float64, pin_memory=pin
        )
        ptrs = {slot: torch.zeros(n, dtype=torch.int64, pin_memory=pin) for slot, n in tables}
        return Staging(rows, ptrs, shape)

    def give(self, staging: Staging) -> None:
        with self._lock:
            self._free.setdefault(staging.shape, []).append(staging)
