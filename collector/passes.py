"""Launching one capture's norm pass on every device, without the host waiting for any GPU.

For each CUDA device: an event recorded on the training (current) stream, the device's side
stream waits on it (a device-side wait), computes the partials, copies them non-blocking
into a pinned staging row, and records ``done``. The training stream is then fenced on
``done`` (again device-side) before it can write gradients in place, either at once or, on
the optimizer path, after the optimizer step so the two overlap.

The partials of a device whose gradients keep their addresses are computed by replaying a
CUDA graph captured on that side stream: one launch instead of one per dtype bucket plus
the foreach chunks, which is what keeps ``capture()`` within tens of microseconds of host
time. A graph reads fixed addresses, so it is only replayed when the gradients' addresses
are exactly those it was captured with.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional, Sequence

import torch

from .norms import partials
from .plan import MAX_KEYS, DeviceSlice, Plan

__all__ = ["DevicePasses"]

log = logging.getLogger("esper_telemetry.collector")

# Rebuilding graphs this often means the allocator keeps moving gradients: stop trying.
_MAX_GRAPH_BUILDS = 16


class DevicePasses:
    """Side streams per CUDA device and the graph policy; used from the training thread only."""

    def __init__(self, use_graphs: bool) -> None:
        self.use_graphs = use_graphs
        self.graph_builds = 0
        self.graph_replays = 0
        self._streams: Dict[torch.device, torch.cuda.Stream] = {}
        self._ready: Dict[torch.device, torch.cuda.Event] = {}

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._streams[device] = stream
        return stream

    def run_cpu(self, plan: Plan, grads: Sequence[torch.Tensor], row: torch.Tensor) -> None:
        """CPU gradients: computed right here, in the caller's thread (nothing to overlap with)."""
        s = plan.cpu
        assert s is not None
        row.copy_(partials([grads[i] for i in s.positions], s.buckets, s.group_index, plan.n_groups))

    def launch_cuda(self, plan: Plan, s: DeviceSlice, grads: Sequence[torch.Tensor],
                    row: torch.Tensor, fence: bool) -> torch.cuda.Event:
        """Queue one device's pass on its side stream; returns the event that marks it done."""
        training = torch.cuda.current_stream(s.device)
        side = self.side_stream(s.device)
        # One "ready" event per device serves every capture: wait_event takes the event's
        # state when it is enqueued, so re-recording it later cannot affect this wait.
        ready = self._ready.get(s.device)
        if ready is None:
            ready = self._ready[s.device] = torch.cuda.Event()
        ready.record(training)
        # The device guard matters only when the plan spans GPUs; skipping it saves host time.
        guard = torch.cuda.device(s.device) if len(plan.cuda) > 1 else contextlib.nullcontext()
        with guard, torch.cuda.stream(side):
            side.wait_event(ready)
            out = self._partials(plan, s, grads, side)
            row.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        if fence:
            training.wait_event(done)
        return done

    def _partials(self, plan: Plan, s: DeviceSlice, grads: Sequence[torch.Tensor],
                  side: torch.cuda.Stream) -> torch.Tensor:
        cached = s.graphs.get(plan.key)
        if cached is not None:
            self.graph_replays += 1
            cached[0].replay()
            return cached[1]
        tensors = [grads[i] for i in s.positions]
        seen = s.seen[plan.key] = s.seen.get(plan.key, 0) + 1
        # Capture on the second use of the same addresses: addresses seen once (the
        # allocator moved the gradients) never pay for a graph.
        if self.use_graphs and seen >= 2 and self.graph_builds < _MAX_GRAPH_BUILDS:
            out = self._capture_graph(plan, s, tensors)
            if out is not None:
                return out
        return partials(tensors, s.buckets, s.group_index, plan.n_groups)

    def _capture_graph(self, plan: Plan, s: DeviceSlice, tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Capture this slice's pass for the current addresses, replay it once, return its output."""
        self.graph_builds += 1
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the completion thread may query events while this one captures.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = partials(tensors, s.buckets, s.group_index, plan.n_groups)
            finally:
                graph.capture_end()
        except Exception as exc:
            self.use_graphs = False
            log.warning("CUDA graph capture failed, using eager norm passes: %s", exc)
            return None
        if len(s.graphs) >= MAX_KEYS:  # the plan forgot the oldest key; so do we
            s.graphs = {k: v for k, v in s.graphs.items() if k in plan.known_keys}
        s.graphs[plan.key] = (graph, out)
        s.seen = {k: v for k, v in s.seen.items() if k in plan.known_keys}
        if self.graph_builds == _MAX_GRAPH_BUILDS:
            log.info("gradients keep moving between captures; CUDA graphs no longer built")
        self.graph_replays += 1
        graph.replay()
        return out
