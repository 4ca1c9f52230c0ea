"""The completion thread: turns finished GPU work into numbers, without anyone waiting on it.

Captures are queued in order with the CUDA events that mark their device work done. The
thread polls the oldest one with ``Event.query()`` (never ``synchronize``: the training
thread must not be the one to wait, and this one should not hold a device lock either),
and only once every event of a capture has completed does it read that capture's pinned
staging buffer and hand it on. Releasing the capture then releases its gradient references
(the side stream is done reading them) and its staging buffer (safe to reuse now).

Beside a user's CUDA graph capture: while any thread captures in the default ``global``
mode (``torch.cuda.graph()``; graphed layers in TransformerEngine and Megatron), CUDA
forbids "potentially unsafe" calls such as ``cudaEventQuery`` and ``cudaEventDestroy`` from
every thread in the default global mode, and invalidates that capture when one happens: the
user's ``capture_end`` would raise in their training loop. Before its first CUDA call this
thread sets its own mode to relaxed (``leave_global_capture_mode``), which CUDA exempts from
other threads' captures. Its events are never recorded inside a capture (``capture()``
skips while the current stream captures), the one kind of call relaxed mode still forbids.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Pending", "CompletionThread", "leave_global_capture_mode"]

log = logging.getLogger("esper_telemetry.collector")

# While work is in flight the poll interval backs off from _POLL_MIN_S to _POLL_MAX_S: every
# wake-up takes the GIL from the training thread, and results are not urgent.
_POLL_MIN_S = 0.0005
_POLL_MAX_S = 0.004
_IDLE_WAIT_S = 0.5  # with nothing in flight (woken by submit)
# While CPU captures keep coming (one completed in the last _LAZY_WINDOW_S), the idle
# thread looks for work every _LAZY_POLL_S instead of being woken by each: waking a thread
# blocked on a lock cost the training thread about 50 us per capture on a 2-core machine;
# a look that finds nothing costs the other core a few us.
_LAZY_POLL_S = 0.01
_LAZY_WINDOW_S = 1.0

# CUstreamCaptureMode (cuda.h): GLOBAL 0, THREAD_LOCAL 1, RELAXED 2.
_CAPTURE_MODE_RELAXED = 2


def leave_global_capture_mode() -> str | None:
    """Exempt the calling thread from other threads' CUDA graph captures; None, or why not.

    ``cuThreadExchangeStreamCaptureMode`` with ``CU_STREAM_CAPTURE_MODE_RELAXED``: "the local
    thread is not prohibited from potentially unsafe API calls", whatever other threads
    capture (see the module's docstring). The mode is the driver's, per thread; the
    runtime's ``cudaThreadExchangeStreamCaptureMode`` (PyTorch's C++
    ``CUDAStreamCaptureModeGuard``, which has no Python binding) sets the same. Called once,
    from the thread itself; it never raises.
    """
    try:
        if torch.version.cuda is None:
            return "not a CUDA build of torch"
        driver = ctypes.CDLL("libcuda.so.1")  # the driver torch has loaded already
        exchange = driver.cuThreadExchangeStreamCaptureMode
        exchange.argtypes = [ctypes.POINTER(ctypes.c_int)]
        exchange.restype = ctypes.c_int
        mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
        status = exchange(ctypes.byref(mode))
    except Exception as exc:  # no driver library, no such symbol: log, and go on as before
        return f"{type(exc).__name__}: {exc}"
    return None if status == 0 else f"cuThreadExchangeStreamCaptureMode returned {status}"


class Pending:
    """One capture in flight: its metadata, device events, staging buffer and held gradients."""

    __slots__ = (
        "step",
        "time",
        "skipped",
        "plan",
        "grads",
        "staging",
        "events",
        "sums",
        "device",
        "amp",
        "finish",
        "abandoned",
        "holding",
    )

    def __init__(
        self,
        step: int,
        time_s: float,
        skipped: bool,
        plan: Any,
        grads: list[Any],
        staging: Any,
        events: list[torch.cuda.Event],
        finish: Callable[[], Any] | None = None,
    ) -> None:
        self.step = step
        self.time = time_s
        self.skipped = skipped
        self.plan = plan
        self.grads: list[Any] | None = grads
        self.staging = staging
        self.events = events
        self.sums: list[list[float]] | None = None  # [[sq...], [nonfinite...]] once done
        self.amp: torch.Tensor | None = None  # GradScaler's (found_inf, scale), see hooks
        # Run here before the rows are read: what the CPU pass read, made into its row.
        self.finish = finish
        # A launch that failed part-way (see Telemetry._abandon): its events only mark the
        # side streams' queued work done; it is released then, never read or published.
        self.abandoned = False
        self.holding: Any = None  # what the rank counts of each group (fingerprint.Holding)
        # A CUDA device of this capture: the thread makes it current before querying, or the
        # runtime would create a context on device 0 for this thread (in every rank).
        self.device: int | None = plan.cuda[0].device.index if getattr(plan, "cuda", None) else None

    def done(self) -> bool:
        return all(e.query() for e in self.events)


class CompletionThread:
    """Polls pending captures in order and calls ``on_done(pending)`` from its own thread;
    ``on_abandoned(pending)`` for an abandoned one once its device work is done."""

    def __init__(
        self,
        on_done: Callable[[Pending], None],
        on_error: Callable[[BaseException], None],
        on_abandoned: Callable[[Pending], None] | None = None,
    ) -> None:
        self._on_done = on_done
        self._on_error = on_error
        self._on_abandoned = on_abandoned
        # Why this thread could not leave global capture mode, once it tried (None: it did).
        self.capture_mode_error: str | None = None
        self._pending: collections.deque[Pending] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.completed = 0
        self.submitted = 0
        self._polling = False  # the idle thread looks every _LAZY_POLL_S (see there)
        self._thread = threading.Thread(
            target=self._loop, name="esper-telemetry-completion", daemon=True
        )
        self._thread.start()

    def submit(self, pending: Pending, wake: bool = True) -> None:
        """Queue a capture. ``wake=False``: it is complete already (a CPU pass) and may wait
        for the thread's next look, at most ``_LAZY_POLL_S`` while captures keep coming."""
        with self._cond:
            self._pending.append(pending)
            self.submitted += 1
            if wake or not self._polling:
                self._cond.notify()

    def in_flight(self) -> int:
        return len(self._pending)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every submitted capture was handed on; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()  # a polling thread looks now
            while self.completed < self.submitted:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.01))
        return True

    def stop(self, timeout_s: float) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        poll = _POLL_MIN_S
        current_device: int | None = None
        relaxed = False
        last_done = 0.0
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    if self._polling and time.monotonic() - last_done > _LAZY_WINDOW_S:
                        self._polling = False  # submit wakes us again from now on
                    self._cond.wait(_LAZY_POLL_S if self._polling else _IDLE_WAIT_S)
                if not self._pending:
                    return
                head = self._pending[0]
            failed = False
            try:
                if head.device is not None and not relaxed:
                    relaxed = True  # before any other CUDA call of this thread
                    self._relax(head.device)
                if head.device is not None and head.device != current_device:
                    torch.cuda.set_device(head.device)
                    current_device = head.device
                ready = head.done()
            except Exception as exc:  # a broken CUDA context: drop the capture, keep going
                ready = failed = True
                self._on_error(exc)
            if not ready:
                if self._stop:
                    return  # closing: do not spin on device work that may never finish
                time.sleep(poll)
                poll = min(poll * 2, _POLL_MAX_S)
                continue
            poll = _POLL_MIN_S
            try:
                if head.abandoned:
                    if not failed and self._on_abandoned is not None:
                        self._on_abandoned(head)
                elif not failed:
                    if head.sums is None:
                        if head.finish is not None:
                            head.finish()
                        head.sums = _sum_rows(head.staging.rows)
                    self._on_done(head)
            except Exception as exc:
                self._on_error(exc)
            finally:
                head.grads = None
                with self._cond:
                    self._pending.popleft()
                    self.completed += 1
                    if not head.events:  # a CPU capture: more may come without a wake-up
                        self._polling = True
                        last_done = time.monotonic()
                    self._cond.notify_all()

    def _relax(self, device: int) -> None:
        why = leave_global_capture_mode()
        if why is not None:  # without a current context on this thread, perhaps: once more
            torch.cuda.set_device(device)
            why = leave_global_capture_mode()
        self.capture_mode_error = why
        if why is not None:
            (log.warning if torch.version.cuda is not None else log.info)(
                "esper-telemetry: the completion thread could not leave global capture mode "
                "(%s): a CUDA graph captured in global mode while captures are in flight may "
                "fail to capture",
                why,
            )


def _sum_rows(staging: torch.Tensor) -> list[list[float]]:
    """Add the per-device partial rows (shape ``(devices, 2, groups)``) on the host."""
    return staging.sum(dim=0).tolist()
