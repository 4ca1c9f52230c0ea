"""Launching one capture's norm pass on every device, without the host waiting for any GPU.

For each CUDA device: an event recorded on the training (current) stream, the device's side
stream waits on it (a device-side wait), computes the partials, copies them non-blocking
into a pinned staging row, and records ``done``. The training stream is then fenced on
``done`` (again device-side) before it can write gradients in place, either at once or, on
the optimizer path, after the optimizer step so the two overlap.

Two ways to compute a device's partials, both replayed as CUDA graphs so that the host
launches one graph instead of dozens of kernels:
- the pointer-table pass (``triton_norms``, when Triton is there and the gradients are dense
  float32/bfloat16/float16): the addresses are data copied in before each replay, so one
  graph per slice serves every capture, wherever the allocator puts the gradients;
- ``_foreach_norm`` (everything else): a graph bakes in the addresses it was captured with,
  so graphs are kept per address set and replayed only on an exact match.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from . import triton_norms
from .cpu_threads import HelperThreads
from .norms import group_sums, group_sums_list, partials, squares
from .plan import DeviceSlice, Plan

# Up to this many CPU tensors the completion thread sums in Python (norms.group_sums_list).
_LIST_SUMS_MAX = 256

__all__ = ["DevicePasses"]

log = logging.getLogger("esper_telemetry.collector")

# Building this many address-bound graphs means the allocator keeps moving gradients: stop.
_MAX_GRAPH_BUILDS = 16


class DevicePasses:
    """Side streams per CUDA device, the kernel choice and graph policy; training thread only."""

    def __init__(
        self, use_graphs: bool, pointer_tables: bool = True, cpu_helpers: int | None = None
    ) -> None:
        self.use_graphs = use_graphs
        self.pointer_tables = pointer_tables and triton_norms.available()
        # Threads that take shares of a CPU pass (cpu_threads); None: one fewer than the cores.
        self.helpers = HelperThreads(cpu_helpers)
        self.graph_builds = 0
        self.graph_replays = 0
        self._address_graphs = 0  # graphs bound to one address set (the _foreach_norm path)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._ready: dict[torch.device, torch.cuda.Event] = {}

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._streams[device] = stream
        return stream

    def run_cpu(
        self, plan: Plan, grads: Sequence[torch.Tensor], row: torch.Tensor
    ) -> Callable[[], None]:
        """CPU gradients: each tensor's sum of squares (or norm), computed here (with helper
        threads, see ``cpu_threads``); returns what turns them into the per-group ``row``, for the
        completion thread (the training thread waits only for the reads of the gradients).

        Raises when a gradient's dtype or device changed in place (see ``plancache``).
        """
        s = plan.cpu
        assert s is not None
        tensors = grads if s.identity else list(map(grads.__getitem__, s.positions))
        parts = self.helpers.squares(tensors, s.shares, s.rows_alone)
        n_groups = plan.n_groups
        if len(tensors) <= _LIST_SUMS_MAX:
            return lambda: row.copy_(
                torch.tensor(
                    group_sums_list(parts, s.owners, n_groups, s.counted_list), dtype=torch.float64
                )
            )
        return lambda: row.copy_(group_sums(squares(parts), s.group_index, n_groups, s.counted))

    def close(self) -> None:
        self.helpers.close()

    def launch_cuda(
        self,
        plan: Plan,
        s: DeviceSlice,
        grads: Sequence[torch.Tensor],
        row: torch.Tensor,
        ptr_buf: torch.Tensor | None,
        fence: bool,
    ) -> torch.cuda.Event:
        """Queue one device's pass on its side stream; returns the event that marks it done.

        ``row`` (pinned) receives the partials; ``ptr_buf`` (pinned) stages the addresses
        for a pointer-table pass. Both belong to this capture until its event completed.
        """
        # The common case (one GPU, the current one) skips the device guard and the stream
        # context manager: set_stream and back costs a fraction of their host time.
        simple = len(plan.cuda) == 1 and s.device.index == torch.cuda.current_device()
        training = torch.cuda.current_stream() if simple else torch.cuda.current_stream(s.device)
        side = self.side_stream(s.device)
        # One "ready" event per device serves every capture: wait_event takes the event's
        # state when it is enqueued, so re-recording it later cannot affect this wait.
        ready = self._ready.get(s.device)
        if ready is None:
            ready = self._ready[s.device] = torch.cuda.Event()
        ready.record(training)
        use_table = s.table is not None and self.pointer_tables and ptr_buf is not None
        if use_table:
            ptr_buf.copy_(
                torch.as_tensor(
                    plan.key if s.identity else [plan.key[i] for i in s.positions],
                    dtype=torch.int64,
                )
            )
        if simple:
            torch.cuda.set_stream(side)
            try:
                done = self._enqueue(
                    plan, s, grads, row, ptr_buf if use_table else None, side, ready
                )
            finally:
                torch.cuda.set_stream(training)
        else:
            with torch.cuda.device(s.device), torch.cuda.stream(side):
                done = self._enqueue(
                    plan, s, grads, row, ptr_buf if use_table else None, side, ready
                )
        if fence:
            training.wait_event(done)
        return done

    def _enqueue(
        self,
        plan: Plan,
        s: DeviceSlice,
        grads: Sequence[torch.Tensor],
        row: torch.Tensor,
        ptr_buf: torch.Tensor | None,
        side: torch.cuda.Stream,
        ready: torch.cuda.Event,
    ) -> torch.cuda.Event:
        """The side stream's work for one capture; the side stream is current here."""
        side.wait_event(ready)
        out = None
        if ptr_buf is not None:
            s.table.ptrs.copy_(ptr_buf, non_blocking=True)
            out = self._table_partials(plan, s)
        if out is None:
            out = self._foreach_partials(plan, s, grads)
        row.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
        return done

    # -- pointer-table pass -------------------------------------------------------------
    def _table_partials(self, plan: Plan, s: DeviceSlice) -> torch.Tensor | None:
        if s.table_graph is not None:
            self.graph_replays += 1
            s.table_graph[0].replay()
            return s.table_graph[1]
        s.table_uses += 1
        try:
            # The first use runs eagerly (Triton compiles its kernel then); later ones capture.
            if self.use_graphs and s.table_uses >= 2:  # one graph per slice, whatever the addresses
                out = self._capture(
                    lambda: group_sums(
                        triton_norms.tensor_squares(s.table),
                        s.group_index,
                        plan.n_groups,
                        s.counted,
                    )
                )
                if out is not None:
                    s.table_graph = out
                    self.graph_replays += 1
                    out[0].replay()
                    return out[1]
            return group_sums(
                triton_norms.tensor_squares(s.table), s.group_index, plan.n_groups, s.counted
            )
        except Exception as exc:
            self.pointer_tables = False
            log.warning("pointer-table norm pass failed, using _foreach_norm: %s", exc)
            return None

    # -- _foreach_norm pass -------------------------------------------------------------
    def _foreach_partials(
        self, plan: Plan, s: DeviceSlice, grads: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        cached = s.graphs.get(plan.key)
        if cached is not None:
            self.graph_replays += 1
            cached[0].replay()
            return cached[1]
        tensors = [grads[i] for i in s.positions]
        # Counted per address set the plan knows; plancache forgets both together.
        seen = s.seen[plan.key] = s.seen.get(plan.key, 0) + 1
        # Capture on the second use of the same addresses: addresses seen once (the
        # allocator moved the gradients) never pay for a graph.
        if self.use_graphs and seen >= 2 and self._address_graphs < _MAX_GRAPH_BUILDS:
            self._address_graphs += 1
            out = self._capture(
                lambda: partials(tensors, s.buckets, s.group_index, plan.n_groups, s.counted)
            )
            if out is not None:
                s.graphs[plan.key] = out
                self.graph_replays += 1
                out[0].replay()
                return out[1]
        return partials(tensors, s.buckets, s.group_index, plan.n_groups, s.counted)

    def _capture(self, compute) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Capture ``compute()`` on the current (side) stream; the graph is not run yet."""
        self.graph_builds += 1
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the completion thread may query events while this one captures.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = compute()
            finally:
                graph.capture_end()
        except Exception as exc:
            self.use_graphs = False
            log.warning("CUDA graph capture failed, using eager norm passes: %s", exc)
            return None
        if self._address_graphs == _MAX_GRAPH_BUILDS:
            log.info("gradients keep moving between captures; no more _foreach_norm graphs")
        return graph, out
