"""Helper threads that compute a share of a CPU norm pass beside the training thread.

Why: ``_foreach_norm`` on the CPU runs one tensor after another on one core, spending most
of its time per tensor with thousands of small gradients, while the training thread waits
for it inside ``capture()``. (Large tensors are read in rows instead, a reduction torch
spreads over the cores itself: those are shared only as the last paragraph says, see
``plan.split_shares``.) Torch releases the GIL inside its kernels, so a share of the tensors
on a second core shortens that wait (at 2,000 tensors of 50 MB in all, on a 2-core machine, by
about a third). Below ``plan.MIN_SHARE_COST`` per share the hand-off costs what it saves,
and the pass stays on one thread.

Bounds: at most ``MAX_HELPERS`` threads, one fewer than the cores torch may use (none on
one core), started on first use. The training thread waits at most ``WAIT_S`` for a
helper's share; past that it computes the share itself, logs once, and uses no helper
again, so a stuck helper costs one capture ``WAIT_S`` at most and never a hang (a helper
that cannot be started: none is used, and the pass runs on the training thread). A helper
hands over the tensors it made (nothing shared is written), so one answering late touches
nothing a later capture reads. An exception in a helper is raised in the training thread
(where ``capture`` counts it), like one in the training thread's own share.

Large tensors on several threads (``one_openmp_thread``): torch reads a large tensor's rows
on OpenMP threads, and a second calling thread starting its own team fights the first one's
(a pass took 3 to 7 times as long). OpenMP's thread count is per calling thread
(``omp_set_num_threads`` sets the caller's ``nthreads-var``), but torch offers only a
process-wide setter (``torch.set_num_threads``, which also sets MKL's and every new
thread's default: the user's matrix products would change). Where torch's intra-op work runs
on OpenMP, helpers set their own count to one, once, and the training thread its own for the
length of its share, then back to what it was: every thread then reads its share alone on
its core (155 tensors of 84,562 on a 2-core AMD EPYC, the pass alone: 0.73x of the
original monitor's, against 0.97x on one thread with torch's two). Only where the threads are as
many as the cores torch uses (up to ``MAX_HELPERS + 1``); elsewhere, or if the setting does
not hold, large tensors stay on the training thread, spread by torch over its threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from .norms import CpuRun, Part, tensor_squares

__all__ = ["HelperThreads", "usable_cores", "one_openmp_thread", "MAX_HELPERS", "WAIT_S"]

log = logging.getLogger("esper_telemetry.collector")

MAX_HELPERS = 3
WAIT_S = 1.0


def usable_cores() -> int:
    """Cores this process may run on, at most as many as torch's intra-op threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()))


class _OpenMP:
    """The OpenMP runtime's per-thread count, as torch's intra-op work sees it."""

    def __init__(self, set_count: Callable[[int], None], get_count: Callable[[], int]) -> None:
        self.set = set_count
        self.get = get_count

    def alone(self) -> bool:
        """Make the calling thread's torch work single-threaded, for good; True if it holds."""
        torch.get_num_threads()  # torch sets a thread's count at its first use: first, then ours
        self.set(1)
        return torch.get_num_threads() == 1


@functools.cache
def _openmp() -> _OpenMP | None:
    """OpenMP's setter and getter where torch runs on OpenMP and a thread's setting holds
    (tried on a thread of its own); None elsewhere (another backend, no symbols, no thread)."""
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
        process = ctypes.CDLL(None)
        set_count = process.omp_set_num_threads
        set_count.argtypes, set_count.restype = [ctypes.c_int], None
        get_count = process.omp_get_max_threads
        get_count.argtypes, get_count.restype = [], ctypes.c_int
        omp = _OpenMP(set_count, get_count)
        held: list[bool] = []
        probe = threading.Thread(target=lambda: held.append(omp.alone()), daemon=True)
        probe.start()
        probe.join(WAIT_S)
    except Exception as exc:  # no symbol (another OpenMP, none), no thread
        log.debug("esper-telemetry: no per-thread OpenMP count: %s", exc)
        return None
    return omp if held == [True] else None


@contextlib.contextmanager
def one_openmp_thread() -> Iterator[None]:
    """The calling thread's torch work single-threaded while inside, then as it was."""
    omp = _openmp()
    if omp is None:
        yield
        return
    # Torch sets a thread's count at its first parallel use (to torch.set_num_threads'
    # figure): first, or it would replace ours inside, and ours would give back OpenMP's.
    torch.get_num_threads()
    before = omp.get()
    try:
        omp.set(1)
        yield
    finally:
        omp.set(before)


class _Helper:
    """One thread, handed one share at a time through two locks (no Python-level condition)."""

    def __init__(self, name: str) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job: tuple | None = None
        self._result: object = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def start(self, tensors: Sequence[torch.Tensor], share: list[CpuRun]) -> None:
        self._job = (tensors, share)
        self._go.release()

    def wait(self, timeout_s: float) -> object:
        """The share's ``tensor_squares`` or its exception; None on timeout."""
        if not self._done.acquire(timeout=timeout_s):
            return None
        result, self._result = self._result, None
        return result

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._job = None
            try:
                self._go.release()
            except RuntimeError:  # pragma: no cover - a share was handed over and not taken yet
                pass

    def _loop(self) -> None:
        omp = _openmp()
        if omp is not None:
            omp.alone()  # a share of large tensors is read on this core alone (see the module)
        with torch.no_grad():  # grad mode is per thread: gradients with history must not grow it
            while True:
                self._go.acquire()
                job, self._job = self._job, None
                if job is None:
                    return
                tensors, share = job
                try:
                    self._result = tensor_squares(tensors, share)
                except BaseException as exc:  # handed to the training thread, raised there
                    self._result = exc
                self._done.release()


class HelperThreads:
    """Up to ``count`` helpers (None: one fewer than ``usable_cores``); ``squares`` splits one pass
    over them and the caller. Training thread only."""

    def __init__(self, count: int | None = None) -> None:
        count = usable_cores() - 1 if count is None else count
        self.count = max(0, min(count, MAX_HELPERS))
        self._helpers: list[_Helper] = []
        self.broken = False
        self._alone: bool | None = None  # share_rows, once decided

    @property
    def share_rows(self) -> bool:
        """Whether large tensors' rows may be cut between the threads (see the module): where
        the threads, each on one core, are as many as the cores torch would use (past
        ``MAX_HELPERS + 1`` cores torch's own threads read a large tensor on more of them).
        Decided once (plans are built on it), and off for good if the helpers are."""
        if self._alone is None:
            self._alone = (
                0 < self.count and self.count + 1 >= usable_cores() and _openmp() is not None
            )
        return self._alone and not self.broken

    def squares(
        self,
        tensors: Sequence[torch.Tensor],
        shares: Sequence[list[CpuRun]],
        alone: bool = False,
    ) -> list[Part]:
        """``tensor_squares`` of every share: the first here, the others on helpers; ``alone``:
        large tensors are among the helpers' shares, and this thread reads its own on one
        OpenMP thread too (``plan.split_shares``)."""
        if self.broken or len(shares) < 2 or self.count == 0:
            if len(shares) == 1:
                return tensor_squares(tensors, shares[0])
            return [n for share in shares for n in tensor_squares(tensors, share)]
        try:
            while len(self._helpers) < min(self.count, len(shares) - 1):
                self._helpers.append(_Helper(f"esper-telemetry-norms-{len(self._helpers)}"))
        except RuntimeError as exc:  # no thread to be had (a process or container limit)
            self._give_up(f"could not start a norm helper thread ({exc})")
            return self.squares(tensors, shares)
        given = list(zip(self._helpers, shares[1:]))
        for helper, share in given:
            helper.start(tensors, share)
        parts: list[list[Part]] = []
        error: BaseException | None = None
        try:
            # Beside the helpers, each thread reads its large tensors on its own core.
            with one_openmp_thread() if alone else contextlib.nullcontext():
                parts.append(tensor_squares(tensors, shares[0]))
        except BaseException as exc:
            error = exc
        # Every helper is waited for, even after an error here: each must be idle again
        # before it is handed the next share.
        for helper, share in given:
            got = helper.wait(WAIT_S)
            if got is None:
                self._give_up(f"a norm helper thread did not answer within {WAIT_S:.1f} s")
                if error is None:
                    got = tensor_squares(tensors, share)
            if isinstance(got, BaseException):
                error = error or got
            elif error is None:
                parts.append(got)  # type: ignore[arg-type]
        if error is not None:
            raise error
        for share in shares[1 + len(given) :]:  # more shares than helpers
            parts.append(tensor_squares(tensors, share))
        return [n for part in parts for n in part]

    def _give_up(self, why: str) -> None:
        if not self.broken:
            self.broken = True
            log.warning(
                "esper-telemetry: %s; CPU norm passes run on the training thread only from now on",
                why,
            )
            self.close()

    def close(self) -> None:
        for helper in self._helpers:
            helper.stop()
        self._helpers = []
