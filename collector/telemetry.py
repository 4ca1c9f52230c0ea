"""``Telemetry``: the object ``attach`` returns, driving captures from the training thread.

Threading: ``capture()`` and the optimizer hooks run in the training thread and only queue
work (GPU kernels on side streams, a record for the completion thread). The completion
thread turns finished captures into results and events; the sender thread owns the socket.
Nothing on this path raises into the training loop: failures are counted in ``stats()``
and logged once per kind. Misuse at attach time raises at once (see ``options``), before
any thread, socket or hook exists.

What lives elsewhere: the groups (``groups``), the plans and their eviction (``plancache``),
the optimizer and GradScaler integration (``hooks``), the events (``reporting``).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from esper_telemetry.events import Goodbye

from .completion import CompletionThread, Pending
from .eager import eager
from .fingerprint import Holding, flat_shards, holding, names_of
from .groups import GroupSpec, disjoint, registration_generation, stale_groups, total_params
from .hooks import Amp, StepHooks
from .isolation import StructuralCheck
from .options import Options
from .passes import DevicePasses
from .placement import Layout, layout, local_grads, unmeasurable
from .plan import Plan
from .plancache import PlanCache
from .publisher import Publisher
from .reporting import Reporter
from .results import CaptureResult
from .staging import Staging, StagingPool

__all__ = ["Telemetry"]

log = logging.getLogger("esper_telemetry.collector")

_NUMEL = torch.Tensor.numel
# FSDP1 shards whose wrapper is not under what was attached (FSDP applied after attach, or
# groups given as parameters without model=): which elements the rank holds is unknown, and
# two halves of one parameter look like replicas to the daemon, which withholds the group.
_UNPLACED = (
    "esper-telemetry: groups %s hold FSDP1 shards whose FullyShardedDataParallel wrapper is "
    "not under the model given to attach: which elements this rank holds is unknown, and the "
    "daemon may withhold these groups as inconsistent; attach after wrapping, with model= the "
    "wrapped model"
)
# Megatron-core's DistributedDataParallel accumulates gradients in main_grad and sets .grad
# to None; with its distributed optimizer each data-parallel rank's buffer is reduced only in
# that rank's part, so main_grad is not read in .grad's place: the groups report no gradient,
# and this says why.
_MAIN_GRAD = (
    "esper-telemetry: groups %s: their parameters carry main_grad (Megatron-core's "
    "DistributedDataParallel accumulates gradients there and leaves .grad None); "
    "esper-telemetry reads .grad, so these groups report no gradient while it stays None"
)

_MAX_IN_FLIGHT = 64
_MAX_IN_FLIGHT_CPU = 4096
# What CPU captures waiting for the completion thread may hold together: each keeps a
# figure per tensor (8 bytes at most) and its staging rows, plus its objects (estimated).
_CPU_BACKLOG_BYTES = 8 << 20
_PENDING_OBJECT_BYTES = 1024


def cpu_backlog(plan: Plan) -> int:
    """How many captures of a CPU-only ``plan`` may wait: ``_MAX_IN_FLIGHT_CPU``, fewer when
    that many would hold more than ``_CPU_BACKLOG_BYTES`` (about 490 at 2,000 tensors)."""
    tensors = 0 if plan.cpu is None else len(plan.cpu.positions)  # None: no gradient at all
    each = _PENDING_OBJECT_BYTES + 8 * (tensors + 2 * plan.n_groups)
    return max(1, min(_MAX_IN_FLIGHT_CPU, _CPU_BACKLOG_BYTES // each))


_live: weakref.WeakSet[Telemetry] = weakref.WeakSet()


class Telemetry:
    """Watches named parameter groups of a training process; made by ``esper_telemetry.attach``."""

    def __init__(self, specs: list[GroupSpec], options: Options) -> None:
        self.options = options
        self.run, self.rank, self.world_size = options.run, options.rank, options.world_size
        self.endpoint = options.endpoint
        self._specs = specs
        self.step = 0  # the step the next capture is, unless told
        self._flat: tuple[torch.Tensor, ...] = ()
        self._group_params: list[tuple[torch.Tensor, ...]] = []
        self._counts: list[int] = []
        self._holding: Holding | None = None  # set with the groups (_resolve)
        self._layout: Layout = layout([], None)  # set with the groups (_resolve)
        self._sharded: list[bool] = []
        self._dtensor = False
        self._rebound: set = set()  # groups whose parameters changed since the last plan
        self._stale: set = set()  # names of groups that can no longer be followed
        self._checked_gen = -1  # registration generation of the last staleness check
        # Element counts of the parameters when the groups were last resolved, until the
        # first capture has compared them (see _resolve).
        self._numels: tuple[int, ...] | None = None
        self._warned: set[str] = set()  # kinds of _warn_once already logged
        self._unfenced: list[tuple[torch.cuda.Stream, torch.cuda.Event]] = []
        self._latest: CaptureResult | None = None
        self._error_kinds: set = set()
        self._closed = False
        self._forked = False
        self._pid = os.getpid()
        self._staging = StagingPool()
        self._passes = DevicePasses(
            use_graphs=options.cuda_graphs, pointer_tables=options.pointer_tables
        )
        self._plans = PlanCache(
            self._on_new_layout,
            self._passes.pointer_tables,
            cpu_shares=1 + self._passes.helpers.count,
            share_rows=self._passes.helpers.share_rows,
        )
        self._structural = StructuralCheck(options.structural)
        self._resolve()
        self._numels = tuple(map(_NUMEL, self._flat))  # compared at the first capture
        # Hooks, then the threads and the socket, last: whatever fails before leaves nothing.
        self._hooks: StepHooks | None = None
        if options.optimizer is not None:
            self._hooks = StepHooks(self, options.optimizer, options.scaler, options.every)
        try:
            self._publisher = Publisher(
                options.endpoint,
                options.run,
                options.rank,
                queue_size=options.queue_size,
                heartbeat_s=options.heartbeat_s,
                curve=options.curve,
            )
        except BaseException:
            self._unhook()
            raise
        self._reporter = Reporter(
            self._publisher,
            specs,
            options.run,
            options.rank,
            options.world_size,
            options.isolation_threshold,
            options.clip_threshold,
        )
        self._completion = CompletionThread(
            self._on_done, self.report_error, lambda p: self._staging.give(p.staging)
        )
        self._reporter.hello(self._counts, self._holding)
        _live.add(self)
        atexit.register(_close_at_exit, weakref.WeakMethod(self.close))

    # -- public API -------------------------------------------------------------------
    def capture(self, step: int | None = None) -> None:
        """Measure every group's gradients as they are now; returns at once, never raises.

        Call it after ``backward()`` (and after any unscaling). On CUDA the host does not
        wait for the GPU: the pass runs on side streams and the training stream is fenced
        (device-side) so later in-place writes cannot race it. On the CPU the pass runs
        here. ``step`` defaults to a counter of captures. Inside a ``torch.compile``d step it
        is one graph break, and runs eagerly (see ``eager``).
        """
        eager(Telemetry.capture_step, self, step, True, False)

    def latest(self) -> CaptureResult | None:
        """The most recent completed capture, or None; never waits."""
        return eager(_latest, self)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every capture so far is computed and given to the socket; False on timeout."""
        deadline = time.monotonic() + timeout_s
        if not self._completion.wait_idle(timeout_s):
            return False
        return self._publisher.drain(max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict[str, int]:
        """Counters since attach: captures, completed, sent, dropped, pending, errors, and more."""
        return {
            "captures": self._completion.submitted,
            "completed": self._completion.completed,
            "sent": self._publisher.sent,
            "dropped": self._publisher.dropped,  # backlog skips included (see _capture)
            "pending": self._completion.in_flight() + self._publisher.depth(),
            "errors": self._publisher.other_errors + self._publisher.errors,
            "plans": self._plans.built,
            "graph_builds": self._passes.graph_builds,
            "graph_replays": self._passes.graph_replays,
            "pointer_tables": int(self._passes.pointer_tables),
        }

    def close(self, timeout_s: float | None = None) -> None:
        """Stop watching and say goodbye; idempotent, and bounded even with no daemon."""
        if self._closed:
            return
        self._closed = True
        timeout_s = self.options.close_timeout_s if timeout_s is None else timeout_s
        self._unhook()
        if self._forked or os.getpid() != self._pid:
            return
        deadline = time.monotonic() + timeout_s
        self.fence_pending()
        self._completion.wait_idle(max(0.0, deadline - time.monotonic()) / 2)
        self._completion.stop(0.1)
        self._passes.close()
        goodbye = Goodbye(self.run, self.rank, time.time(), "close")
        self._publisher.close(goodbye, max(0.05, deadline - time.monotonic()))

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the capture path (training thread; also the hooks' Driver) --------------------
    def capture_step(
        self, step: int | None, fence: bool, skipped: bool, amp: Amp | None = None
    ) -> None:
        """One capture, never raising: a failure is counted and logged once per kind.

        ``amp``: GradScaler's ``found_inf`` (and the scale, when the gradients are still
        scaled on a skipped step) for an optimizer that skips inside its own step.
        """
        if self._closed or self._forked:
            return
        try:
            if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                # Inside the user's own CUDA graph capture our events and copies would be
                # captured into their graph: skip, and count it.
                self.step = (self.step if step is None else int(step)) + 1
                self._publisher.count(dropped=1)
                return
            with torch.no_grad():  # after backward(create_graph=True) grads carry history
                self._capture(step, fence, skipped, amp)
        except Exception as exc:
            self.report_error(exc)

    def fence_pending(self) -> None:
        """Make the training streams wait (device-side) for unfenced captures' reads."""
        unfenced, self._unfenced = self._unfenced, []
        for stream, event in unfenced:
            stream.wait_event(event)

    def report_error(self, exc: BaseException) -> None:
        """Count a failure where heartbeats carry it; log its kind once."""
        self._publisher.count(other_errors=1)
        kind = type(exc).__name__
        if kind not in self._error_kinds:
            self._error_kinds.add(kind)
            log.warning(
                "esper-telemetry: %s: %s (training goes on; further %s errors only counted)",
                kind,
                exc,
                kind,
            )

    def _capture(self, step: int | None, fence: bool, skipped: bool, amp: Amp | None) -> None:
        if step is None:
            step = self.step
        if isinstance(step, torch.Tensor) and step.device.type != "cpu":
            raise TypeError(
                "capture(step=...) takes an int or a CPU tensor: reading a GPU tensor would "
                "make the host wait for the GPU"
            )
        step = int(step)  # a tensor or numpy step would fail to encode, losing its whole batch
        if step < 0:  # the wire carries counts: the daemon would reject this capture's batch
            raise ValueError(f"capture step must be >= 0, got {step}")
        self.step = step + 1
        for name, evidence in self._structural.take():  # leaks seen since the last capture
            self._reporter.structural(step, name, evidence)
        rebound = self._resolve()
        grads = [p.grad for p in self._flat]
        if self._dtensor:
            grads, bad = local_grads(grads, self._layout)
            if bad:  # those groups report no number this capture; the rest goes on
                self.report_error(
                    unmeasurable({self._specs[gi].name: why for gi, why in bad.items()})
                )
        plan = self._plans.plan_for(
            grads, rebound, self._group_params, self._sharded, self._counts, self._layout.counted
        )
        # Far behind (the GPU, or the completion thread): skip rather than queue more. CPU
        # captures cost the completion thread little, so they get a much larger allowance,
        # bounded in bytes too.
        if self._completion.in_flight() >= (_MAX_IN_FLIGHT if plan.cuda else cpu_backlog(plan)):
            self._publisher.count(
                dropped=1
            )  # a lost Norms event: counted where heartbeats carry it
            return
        staging = self._staging.take(plan)
        finish = None
        if plan.cpu is not None:
            try:
                finish = self._passes.run_cpu(plan, grads, staging.rows[plan.cpu.slot])
            except Exception:
                if plan.cuda or rebound:
                    raise
                # A CPU plan is kept by which gradients exist, not by their dtypes and
                # devices: one changed in place (model.double(), a .data moved) makes the
                # pass raise. Look the plan up by what they are now, once.
                self._staging.give(staging)
                plan = self._plans.plan_for(
                    grads,
                    False,
                    self._group_params,
                    self._sharded,
                    self._counts,
                    self._layout.counted,
                    refit=True,
                )
                staging = self._staging.take(plan)
                if plan.cpu is not None:
                    finish = self._passes.run_cpu(plan, grads, staging.rows[plan.cpu.slot])
        events: list[torch.cuda.Event] = []
        try:
            for s in plan.cuda:
                events.append(
                    self._passes.launch_cuda(
                        plan, s, grads, staging.rows[s.slot], staging.ptrs.get(s.slot), fence
                    )
                )
            pair = None if amp is None else _stage_amp(amp, events, staging)
        except BaseException:
            if plan.cuda:
                self._abandon(step, plan, grads, staging)
            raise
        if not fence:
            self._unfenced.extend(
                (torch.cuda.current_stream(s.device), e) for s, e in zip(plan.cuda, events)
            )
        # Holding the gradients keeps the allocator from handing their memory out again
        # (after zero_grad(set_to_none=True)) until the side streams are done reading.
        held = grads if plan.cuda else []
        pending = Pending(step, time.time(), skipped, plan, held, staging, events, finish)
        pending.amp = pair
        pending.holding = self._holding
        # A CPU capture is complete: the completion thread may take it at its next look.
        self._completion.submit(pending, wake=bool(events))

    def _abandon(self, step: int, plan: Plan, grads: list[Any], staging: Any) -> None:
        """A launch that raised part-way: hold what its queued device work reads and writes.

        The side streams may have queued reads of the gradients and copies into the staging
        buffer before the failure, with no event left to say when they end. A fresh event on
        each side stream marks everything queued there so far; the training streams wait on
        it (device-side: in-place writes after this call cannot race those reads), and a
        capture marked abandoned holds the gradients and the staging buffer until it
        completes, then gives them back unread (``CompletionThread``). Never raises: the
        launch's own error is the one counted.
        """
        try:
            events = []
            for s in plan.cuda:
                with torch.cuda.device(s.device):
                    queued = torch.cuda.Event()
                    queued.record(self._passes.side_stream(s.device))
                    torch.cuda.current_stream(s.device).wait_event(queued)
                events.append(queued)
            pending = Pending(step, time.time(), False, plan, grads, staging, events)
            pending.abandoned = True
            self._completion.submit(pending)
        except Exception as exc:  # a broken context: nothing more can be done from here
            log.debug("esper-telemetry: could not hold an abandoned capture: %s", exc)

    def _resolve(self) -> bool:
        """Re-resolve every group from the live model; True if any group's parameters changed.

        At the first capture a parameter whose element count changed since attach counts as
        a change too: FSDP1 (``use_orig_params=True``) wrapped after attach keeps the
        Parameter objects and makes each a view of this rank's shard, which no registration
        shows. What the rank counts and its fingerprint are then taken again."""
        changed = self._numels is not None and self._numels != tuple(map(_NUMEL, self._flat))
        self._numels = None
        group_params = []
        for gi, spec in enumerate(self._specs):
            params, c = spec.resolve()
            group_params.append(params)
            if c and self._group_params:
                self._rebound.add(gi)
            changed = changed or c
        gen = registration_generation()
        if self._group_params and (changed or gen != self._checked_gen):
            self._checked_gen = gen
            self._check_stale()
        if changed or not self._group_params:
            group_params, _ = disjoint(self._specs, group_params)
            self._group_params = group_params
            self._flat = tuple(p for ps in group_params for p in ps)
            self._counts = [total_params(ps) for ps in group_params]
            # Sharded groups and what this rank counts of them (placement): each element once.
            self._layout = layout(group_params, self.options.sharded, self.world_size)
            # And what it counts, as the daemon compares it across ranks (fingerprint).
            roots = [s._root() for s in self._specs if s._root is not None]
            modules = [roots[0] if roots else None, *(s.module for s in self._specs)]
            names = names_of(modules[0], modules[1:])
            shards = flat_shards(modules)
            if self.world_size > 1:
                self._warn_once(
                    "unplaced",
                    lambda p: getattr(p, "_fsdp_flattened", False) and id(p) not in shards,
                    _UNPLACED,
                )
            self._warn_once("main_grad", lambda p: hasattr(p, "main_grad"), _MAIN_GRAD)
            self._holding = holding(
                group_params, self._layout, names, self.rank, self.options.sharded, shards
            )
            self._sharded = self._layout.sharded
            self._dtensor = self._layout.placements is not None
            self._structural.watch(self._specs)
            return True
        return False

    def _warn_once(self, kind: str, holds: Callable[[torch.Tensor], bool], message: str) -> None:
        """Once per ``kind``: log ``message`` naming the groups with a parameter that
        ``holds``."""
        if kind in self._warned:
            return
        named = [s.name for s, ps in zip(self._specs, self._group_params) if any(map(holds, ps))]
        if named:
            self._warned.add(kind)
            log.warning(message, named)

    def _check_stale(self) -> None:
        """Report, once each, groups that can no longer be followed; and their return as moved."""
        stale = set(stale_groups(self._specs))
        for gi, spec in enumerate(self._specs):
            if spec.name in stale and spec.name not in self._stale:
                log.warning(
                    "esper-telemetry: group %r can no longer be followed: %s; it is reported "
                    "as stale, not measured",
                    spec.name,
                    spec.unfollowed
                    or "what was given for it is no longer in the model (pass a dotted path "
                    "or a callable to follow replacements)",
                )
                self._reporter.device("stale", spec.name, ())
            elif spec.name in self._stale and spec.name not in stale:
                self._rebound.add(gi)
        self._stale = stale

    def _on_new_layout(self, old: Plan | None, new: Plan) -> None:
        self._reporter.layout(old, new, tuple(self._rebound), self._stale)
        self._rebound.clear()

    def _unhook(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._structural.remove()

    # -- completion thread --------------------------------------------------------------
    def _on_done(self, pending: Pending) -> None:
        sq_row, nf_row = pending.sums  # type: ignore[misc]
        skipped = pending.skipped
        if pending.amp is not None:
            found_inf, scale = pending.amp.tolist()
            if found_inf:
                # The optimizer skipped this step inside its kernel; gradients it had not
                # unscaled yet are reported unscaled, like every other skipped step's.
                skipped = True
                sq_row = [sq / (scale * scale) for sq in sq_row]
        self._latest = self._reporter.norms(
            pending.step,
            pending.time,
            skipped,
            pending.plan,
            sq_row,
            nf_row,
            frozenset(self._stale),
            pending.holding,
        )
        self._staging.give(pending.staging)


def _latest(tel: Telemetry) -> CaptureResult | None:
    # A plain attribute read, but one dynamo must not bake into a graph as a constant.
    return tel._latest


def _stage_amp(amp: Amp, events: list[Any], staging: Staging) -> torch.Tensor:
    """GradScaler's ``found_inf`` and scale, copied for the completion thread without a wait.

    On CUDA the copy goes to the staging's pinned pair (``Staging.amp_pair``), non-blocking,
    on the stream that produced them, and its event joins the capture's: the completion
    thread reads the pair once it is done.
    """
    found_inf, scale = amp
    device = found_inf.device
    one = torch.ones((), dtype=torch.float64, device=device)
    pair = torch.stack(
        [
            found_inf.reshape(()).to(torch.float64),
            one if scale is None else scale.reshape(()).to(device, torch.float64),
        ]
    )
    if device.type != "cuda":
        return pair
    host = staging.amp_pair()
    host.copy_(pair, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    events.append(done)
    return host


def _close_at_exit(ref: weakref.WeakMethod) -> None:
    close = ref()
    if close is not None:
        close(timeout_s=1.0)


def _after_fork_in_child() -> None:
    # The parent's threads do not exist here and its ZeroMQ context must not be used.
    for tel in list(_live):
        tel._forked = True
        tel._closed = True
        tel._unhook()  # the child's forward passes and steps must not report into our queue


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
