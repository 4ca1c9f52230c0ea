"""``Telemetry``: the object ``attach`` returns, driving captures from the training thread.

Threading: ``capture()`` and the optimizer hooks run in the training thread and only queue
work (GPU kernels on side streams, a record for the completion thread). The completion
thread turns finished captures into results and events; the sender thread owns the socket.
Nothing on this path raises into the training loop: failures are counted in ``stats()``
and logged once per kind. Misuse at attach time raises at once.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import os
import socket
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from esper_telemetry.events import (
    DeviceMismatch,
    GroupDecl,
    GroupNorm,
    Goodbye,
    Hello,
    IsolationViolation,
    Norms,
)
from esper_telemetry.version import __version__

from .completion import CompletionThread, Pending
from .groups import GroupSpec, total_params
from .isolation import StructuralCheck
from .passes import DevicePasses
from .plan import Plan, build_plan, grad_key, grad_signature, is_dtensor, is_sharded, local_tensor
from .publisher import Publisher
from .results import CaptureResult, GroupResult, seed_ratio
from .staging import StagingPool

__all__ = ["Telemetry"]

log = logging.getLogger("esper_telemetry.collector")

_MAX_IN_FLIGHT = 64
_MAX_IN_FLIGHT_CPU = 4096
_MAX_PLANS = 4
_live: "weakref.WeakSet[Telemetry]" = weakref.WeakSet()


class Telemetry:
    """Watches named parameter groups of one training process; see ``esper_telemetry.collector.attach``."""

    def __init__(self, specs: List[GroupSpec], *, run: str, endpoint: str, rank: int,
                 world_size: int, sharded: Optional[bool], shared_device: torch.device,
                 optimizer: Optional[torch.optim.Optimizer], every: int, scaler: Any,
                 isolation_threshold: float, cuda_graphs: bool, pointer_tables: bool, heartbeat_s: float,
                 queue_size: int, close_timeout_s: float) -> None:
        self.run, self.rank, self.world_size, self.endpoint = run, rank, world_size, endpoint
        self._specs = specs
        self._names = [s.name for s in specs]
        self._host = next((i for i, s in enumerate(specs) if s.role == "host"), None)
        self._forced_sharded = sharded
        self._shared = shared_device
        self._threshold = isolation_threshold
        self._close_timeout_s = close_timeout_s
        self._every = every
        self._step = 0
        self._plan: Optional[Plan] = None
        self._plans: "collections.OrderedDict[Tuple[Any, ...], Plan]" = collections.OrderedDict()
        self._flat: Tuple[torch.Tensor, ...] = ()
        self._group_params: List[Tuple[torch.Tensor, ...]] = []
        self._counts: List[int] = []
        self._sharded: List[bool] = []
        self._dtensor = False
        self._rebound: set = set()   # groups whose parameters changed since the last plan
        self._reported: Dict[Tuple[str, str], Tuple[str, ...]] = {}
        self._staging = StagingPool()
        self._unfenced: List[Tuple[torch.cuda.Stream, torch.cuda.Event]] = []
        self._latest: Optional[CaptureResult] = None
        self._error_kinds: set = set()
        self._closed = False
        self._forked = False
        self._pid = os.getpid()
        self._handles: List[Any] = []
        self._scaler = scaler
        self._stepped = False
        self._deferred: Optional[int] = None   # a capture moved to the post-hook
        self.plans_built = 0

        self._passes = DevicePasses(use_graphs=cuda_graphs, pointer_tables=pointer_tables)
        self._publisher = Publisher(endpoint, run, rank, queue_size=queue_size, heartbeat_s=heartbeat_s)
        self._completion = CompletionThread(self._on_done, self._on_error)
        self._structural = StructuralCheck(self._report_structural)
        self._resolve()
        self._publisher.publish(self._hello())
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))
            if scaler is not None:
                self._wrap_scaler(scaler)
        _live.add(self)
        self._atexit = weakref.WeakMethod(self.close)
        atexit.register(_close_at_exit, self._atexit)

    # -- public API -------------------------------------------------------------------
    def capture(self, step: Optional[int] = None) -> None:
        """Measure every group's gradients as they are now; returns at once, never raises.

        Call it after ``backward()`` (and after any unscaling). On CUDA the host does not
        wait for the GPU: the pass runs on side streams and the training stream is fenced
        (device-side) so later in-place writes cannot race it. On the CPU the pass runs
        here. ``step`` defaults to a counter of captures.
        """
        self._safe_capture(step, fence=True, skipped=False)

    def latest(self) -> Optional[CaptureResult]:
        """The most recent completed capture, or None; never waits."""
        return self._latest

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every capture so far is computed and handed to the socket; False on timeout."""
        deadline = time.monotonic() + timeout_s
        if not self._completion.wait_idle(timeout_s):
            return False
        return self._publisher.drain(max(0.0, deadline - time.monotonic()))

    def stats(self) -> Dict[str, int]:
        """Counters since attach: captures, completed, sent, dropped, pending, errors, and more."""
        return {
            "captures": self._completion.submitted,
            "completed": self._completion.completed,
            "sent": self._publisher.sent,
            "dropped": self._publisher.dropped,   # backlog skips included (see _capture)
            "pending": self._completion.in_flight() + self._publisher.depth(),
            "errors": self._publisher.other_errors + self._publisher.errors,
            "plans": self.plans_built,
            "graph_builds": self._passes.graph_builds,
            "graph_replays": self._passes.graph_replays,
            "pointer_tables": int(self._passes.pointer_tables),
        }

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Stop watching and say goodbye; idempotent, and bounded even with no daemon."""
        if self._closed:
            return
        self._closed = True
        timeout_s = self._close_timeout_s if timeout_s is None else timeout_s
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._structural.remove()
        if self._scaler is not None and "update" in vars(self._scaler):
            del self._scaler.update
        if self._forked or os.getpid() != self._pid:
            return
        deadline = time.monotonic() + timeout_s
        self._fence_pending()
        self._completion.wait_idle(max(0.0, deadline - time.monotonic()) / 2)
        self._completion.stop(0.1)
        goodbye = Goodbye(self.run, self.rank, time.time(), "close")
        self._publisher.close(goodbye, max(0.05, deadline - time.monotonic()))

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the capture path (training thread) ---------------------------------------------
    def _safe_capture(self, step: Optional[int], fence: bool, skipped: bool) -> None:
        if self._closed or self._forked:
            return
        try:
            if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                # Inside the user's own CUDA graph capture our events and copies would be
                # captured into their graph: skip, and count it.
                self._step = (self._step if step is None else int(step)) + 1
                self._publisher.count(dropped=1)
                return
            self._capture(step, fence, skipped)
        except Exception as exc:
            self._on_error(exc)

    def _capture(self, step: Optional[int], fence: bool, skipped: bool) -> None:
        if step is None:
            step = self._step
        if isinstance(step, torch.Tensor) and step.device.type != "cpu":
            raise TypeError("capture(step=...) takes an int or a CPU tensor: reading a GPU tensor would "
                            "make the host wait for the GPU")
        step = int(step)  # a tensor or numpy step would fail to encode, losing its whole batch
        if step < 0:  # the wire carries counts: the daemon would reject this capture's batch
            raise ValueError(f"capture step must be >= 0, got {step}")
        self._step = step + 1
        changed = self._resolve()
        grads = [p.grad for p in self._flat]
        if self._dtensor:
            grads = [local_tensor(g) for g in grads]
        plan = self._current_plan(grads, changed)
        # Far behind (the GPU, or the completion thread): skip rather than queue more. CPU
        # captures cost the completion thread little, so they get a much larger allowance.
        if self._completion.in_flight() >= (_MAX_IN_FLIGHT if plan.cuda else _MAX_IN_FLIGHT_CPU):
            self._publisher.count(dropped=1)  # a lost Norms event: counted where heartbeats carry it
            return
        staging = self._staging.take(plan)
        events: List[torch.cuda.Event] = []
        if plan.cpu is not None:
            self._passes.run_cpu(plan, grads, staging.rows[plan.cpu.slot])
        for s in plan.cuda:
            events.append(self._passes.launch_cuda(plan, s, grads, staging.rows[s.slot],
                                                   staging.ptrs.get(s.slot), fence))
        if not fence:
            self._unfenced.extend((torch.cuda.current_stream(s.device), e)
                                  for s, e in zip(plan.cuda, events))
        # Holding the gradients keeps the allocator from handing their memory out again
        # (after zero_grad(set_to_none=True)) until the side streams are done reading.
        held = grads if plan.cuda else []
        self._completion.submit(Pending(step, time.time(), skipped, plan, held, staging, events))

    def _resolve(self) -> bool:
        """Re-resolve every group from the live model; True if any group's parameters changed."""
        changed = False
        group_params = []
        for gi, spec in enumerate(self._specs):
            params, c = spec.resolve()
            group_params.append(params)
            if c and self._group_params:
                self._rebound.add(gi)
            changed = changed or c
        if changed or not self._group_params:
            self._group_params = group_params
            self._flat = tuple(p for ps in group_params for p in ps)
            self._counts = [total_params(ps) for ps in group_params]
            self._dtensor = any(is_dtensor(p) for p in self._flat)
            forced = self._forced_sharded
            self._sharded = [forced if forced is not None else any(is_sharded(p) for p in ps)
                             for ps in group_params]
            self._structural.watch([s for s in self._specs if s.role == "seed"])
            return True
        return False

    def _current_plan(self, grads: List[Optional[torch.Tensor]], changed: bool) -> Plan:
        plan = self._plan
        key = grad_key(grads)
        if plan is not None and not changed and plan.fits(key):
            return plan
        signature = grad_signature(grads)
        if changed:
            self._plans.clear()  # plans of other parameters
        else:
            # Same devices and dtypes at other addresses, or a layout seen before (a seed
            # whose gradient is None on the steps it sits out): reuse that plan and its graphs.
            known = self._plans.get(signature)
            if known is not None:
                known.adopt(key)
                if plan is not None and known.group_devices != plan.group_devices:
                    self._report_devices(plan, known)   # moved back to where it was before
                self._plans.move_to_end(signature)
                self._plan = known
                return known
        new = build_plan(self._group_params, grads, key, signature, self._sharded,
                         self._counts, pointer_tables=self._passes.pointer_tables)
        self.plans_built += 1
        self._report_devices(plan, new)
        self._plans[signature] = new
        if len(self._plans) > _MAX_PLANS:
            self._plans.popitem(last=False)
        self._plan = new
        return new

    def _fence_pending(self) -> None:
        """Make the training streams wait (device-side) for unfenced captures' reads."""
        unfenced, self._unfenced = self._unfenced, []
        for stream, event in unfenced:
            stream.wait_event(event)

    # -- optimizer path -----------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._stepped = True
        step = self._step
        if step % self._every != 0:
            self._step = step + 1
        elif getattr(optimizer, "grad_scale", None) is not None:
            # GradScaler handed the loss scale to an optimizer that unscales the gradients
            # in place inside its (fused) step: they are final, and written, only after it.
            self._deferred = step
        else:
            self._safe_capture(step, fence=False, skipped=False)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._deferred is not None:
            step, self._deferred = self._deferred, None
            self._safe_capture(step, fence=True, skipped=False)
        try:
            self._fence_pending()
        except Exception as exc:
            self._on_error(exc)

    def _wrap_scaler(self, scaler: Any) -> None:
        """Report steps GradScaler skips: it calls ``update()`` but never ``optimizer.step()``."""
        original = scaler.update
        telemetry = weakref.ref(self)

        def update(*args: Any, **kwargs: Any) -> Any:
            tel = telemetry()
            if tel is not None and not tel._closed:
                if not tel._stepped:
                    step = tel._step
                    if step % tel._every == 0:
                        tel._safe_capture(step, fence=True, skipped=True)
                    else:
                        tel._step = step + 1
                tel._stepped = False
            return original(*args, **kwargs)

        scaler.update = update

    # -- completion thread --------------------------------------------------------------
    def _on_done(self, pending: Pending) -> None:
        plan: Plan = pending.plan
        sq_row, nf_row = pending.sums  # type: ignore[misc]
        results: Dict[str, GroupResult] = {}
        wire: List[GroupNorm] = []
        for gi, spec in enumerate(self._specs):
            has = plan.has_grad[gi]
            sq = sq_row[gi] if has else None
            nf = int(nf_row[gi])
            r = GroupResult(spec.name, spec.role, plan.group_params[gi], sq, nf, has,
                            plan.sharded[gi], spec.isolated)
            results[spec.name] = r
            wire_sq = sq if sq is None or math.isfinite(sq) else None
            wire.append(GroupNorm(spec.name, spec.role, r.params, wire_sq, nf, r.sharded, spec.isolated))
        ratios: Dict[str, float] = {}
        if self._host is not None:
            host = results[self._names[self._host]]
            ratios = {r.name: seed_ratio(r, host) for r in results.values() if r.role == "seed"}
        self._latest = CaptureResult(pending.step, pending.time, self.rank, pending.skipped, results, ratios)
        self._publisher.publish(Norms(self.run, self.rank, pending.time, pending.step, pending.skipped, tuple(wire)))
        for r in results.values():
            if r.isolated and r.sq is not None and (r.nonfinite or not r.sq <= self._threshold ** 2):
                self._publisher.publish(IsolationViolation(
                    self.run, self.rank, pending.time, pending.step, r.name, "gradient",
                    f"isolated group received gradient (norm {r.norm:.3g}, {r.nonfinite} non-finite tensors)",
                    r.norm if r.norm is not None and math.isfinite(r.norm) else None,
                ))
        self._staging.give(pending.staging)

    def _on_error(self, exc: BaseException) -> None:
        self._publisher.count(other_errors=1)  # where heartbeats carry it
        kind = type(exc).__name__
        if kind not in self._error_kinds:
            self._error_kinds.add(kind)
            log.warning("esper-telemetry: %s: %s (training goes on; further %s errors only counted)",
                        kind, exc, kind)

    # -- events -------------------------------------------------------------------------
    def _hello(self) -> Hello:
        decls = tuple(GroupDecl(s.name, s.role, c, s.isolated) for s, c in zip(self._specs, self._counts))
        return Hello(self.run, self.rank, time.time(), self.world_size, socket.gethostname()[:256],
                     os.getpid(), __version__, torch.__version__, decls)

    def _device_event(self, kind: str, group: str, devices: Sequence[str]) -> None:
        self._publisher.publish(DeviceMismatch(self.run, self.rank, time.time(), kind, group, tuple(devices)))

    def _report_devices(self, old: Optional[Plan], new: Plan) -> None:
        """Device events on a new plan, each condition once: split, mixed, moved."""
        host_devices = new.group_devices[self._host] if self._host is not None else ()
        for gi, name in enumerate(self._names):
            devices = new.group_devices[gi]
            state = {
                "split": devices if len(devices) > 1 else (),
                "mixed": devices if (self._specs[gi].role == "seed" and host_devices
                                     and devices and set(devices) != set(host_devices)) else (),
            }
            for kind, value in state.items():
                if value and self._reported.get((kind, name)) != value:
                    self._device_event(kind, name, value)
                self._reported[(kind, name)] = value
            if old is not None and (gi in self._rebound or old.group_devices[gi] != devices):
                self._device_event("moved", name, devices)
        self._rebound.clear()

    def _report_structural(self, name: str, evidence: str) -> None:
        if self._forked:
            return
        self._publisher.publish(IsolationViolation(self.run, self.rank, time.time(), self._step,
                                                   name, "structural", evidence, None))


def _close_at_exit(ref: "weakref.WeakMethod") -> None:
    close = ref()
    if close is not None:
        close(timeout_s=1.0)


def _after_fork_in_child() -> None:
    # The parent's threads do not exist here and its ZeroMQ context must not be used.
    for tel in list(_live):
        tel._forked = True
        tel._closed = True
        tel._structural.remove()   # the child's forward passes must not report into our queue
        for handle in tel._handles:
            handle.remove()
        tel._handles.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
