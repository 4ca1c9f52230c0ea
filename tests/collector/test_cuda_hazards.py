"""The collector on CUDA beside what training does at the same time: a user's CUDA graph captured
in global mode, a launch that fails part-way, gradients re-allocated at the same addresses with
another dtype or size, and a training stream still busy when the collector is called.

Each test compares against a float64 reference computed on the CPU. Skipped cleanly without
CUDA; tools/gpu-check.sh runs them on a lent GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from cuda_support import KERNELS, HostSeeds, assert_close, busy_for, no_sync, ref_sq, train_step

import esper_telemetry as et
from esper_telemetry.collector import completion

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SEEDS = {"a": "seeds.a", "b": "seeds.b"}


def _norms(pull) -> dict[int, dict[str, et.GroupNorm]]:
    """Per step, the groups of every Norms event received until the collector's Goodbye."""
    return {
        e.step: {g.name: g for g in e.groups}
        for e in pull.until_goodbyes(timeout_s=10.0)
        if isinstance(e, et.Norms)
    }


# --- a user's CUDA graph captured in global mode ---------------------------------------------


def test_a_global_mode_capture_while_a_capture_is_in_flight_is_not_invalidated(
    attach, pull, monkeypatch
):
    """The completion thread polls its events during the user's capture (shown by the poll
    times); in global mode CUDA would invalidate the capture for that, and capture_end raise,
    had the thread not left global mode. This is also its first CUDA call (no warm-up)."""
    polls: list[float] = []
    done = completion.Pending.done
    monkeypatch.setattr(
        completion.Pending, "done", lambda self: polls.append(time.monotonic()) or done(self)
    )
    model = HostSeeds().cuda()
    tel = attach(model=model, host=model.host, seeds=SEEDS)
    train_step(model)
    want = ref_sq(model.host.parameters())
    x = torch.ones(4096, device="cuda")
    busy = busy_for(0.5)  # the capture's side-stream work waits behind this
    tel.capture(step=0)
    assert not busy.query() and tel._completion.in_flight() == 1
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="global")
        began = time.monotonic()
        try:
            y = x * 2 + 1
            time.sleep(0.2)  # the completion thread polls meanwhile, every few ms
        finally:
            ended = time.monotonic()
            graph.capture_end()  # raises when the capture was invalidated
    assert sum(began < t < ended for t in polls) >= 5
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 3.0))
    assert tel.flush(10.0)
    stats, result = tel.stats(), tel.latest()
    assert stats["errors"] == 0 and stats["completed"] == 1
    assert tel._completion.capture_mode_error is None
    assert_close(result["host"].sq, want, 1e-5)


def test_torch_cuda_graph_right_after_captures(attach, pull):
    """torch.cuda.graph() in its default global mode right after captures, the completion
    thread finishing them (events queried and destroyed, results published) meanwhile."""
    model = HostSeeds().cuda()
    tel = attach(model=model, host=model.host, seeds=SEEDS)
    x = torch.ones(4096, device="cuda")
    wants = {}
    for i in range(4):
        model.zero_grad(set_to_none=True)
        train_step(model)
        wants[i] = ref_sq(model.host.parameters())
        with no_sync():
            tel.capture(step=i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # synchronizes on entry: the captures complete inside
        y = x * 3
        time.sleep(0.05)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 3.0))
    assert tel.flush(10.0) and tel.stats()["errors"] == 0
    tel.close()
    norms = _norms(pull)
    assert sorted(norms) == [0, 1, 2, 3]
    for step, groups in norms.items():
        assert_close(groups["host"].sq, wants[step], 1e-5)


# --- a launch that fails part-way ------------------------------------------------------------


def test_a_launch_that_fails_part_way_is_held_and_fenced(attach, pull):
    """The side stream had queued work (here: reads, then half a second of sleep) when the
    launch raised: the training stream must wait for it (device-side), the capture must hold
    the gradients and staging buffer until it is done, and nothing is published for it."""
    model = HostSeeds().cuda()
    tel = attach(model=model, host=model.host, seeds=SEEDS)
    busy_for(0.001)  # calibrates (synchronizes) here, not inside the launch
    train_step(model)
    with no_sync():
        tel.capture(step=0)
    assert tel.flush(10.0)
    enqueue = tel._passes._enqueue

    def fails_after_queueing(*args, **kwargs):
        enqueue(*args, **kwargs)
        busy_for(0.5)  # on the side stream, current inside the launch
        raise RuntimeError("injected: the launch fails after queueing work")

    tel._passes._enqueue = fails_after_queueing
    with no_sync():
        tel.capture(step=1)  # counted, not raised
    training = torch.cuda.Event()
    training.record()
    time.sleep(0.1)
    assert not training.query()  # fenced: the training stream waits for the queued work
    assert tel._completion.in_flight() == 1
    held = tel._completion._pending[0]
    assert held.abandoned and held.grads is not None and held.staging is not None
    del tel._passes._enqueue
    model.zero_grad(set_to_none=True)
    train_step(model)
    want = ref_sq(model.host.parameters())
    with no_sync():
        tel.capture(step=2)
    assert tel.flush(10.0)
    stats = tel.stats()
    assert stats["errors"] == 1 and stats["completed"] == 3 and held.grads is None
    assert sum(len(free) for free in tel._staging._free.values()) >= 1  # given back
    tel.close()
    norms = _norms(pull)
    assert sorted(norms) == [0, 2]  # nothing published for the abandoned capture
    assert_close(norms[2]["host"].sq, want, 1e-5)


# --- other gradients at the same addresses ---------------------------------------------------


class Flat(torch.nn.Module):
    """1-D parameters, so a resized .data is simply fewer elements."""

    def __init__(self) -> None:
        super().__init__()
        self.host = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(4096)) for _ in range(4)]
        )


@pytest.mark.parametrize("tables", KERNELS)
@pytest.mark.parametrize("change", ["half", "bfloat16", "shrink"])
def test_gradients_at_the_same_addresses_with_another_dtype_or_size(attach, pull, tables, change):
    """An in-place cast (the Parameter objects kept) or a resized .data, and gradients landing
    at the very addresses the plan (and its graph) was built for: the plan must not be
    replayed for them (the old code read the new bytes as the old dtype, or past the end)."""
    model = Flat().cuda()
    params = list(model.host)
    tel = attach(host=model.host, pointer_tables=tables, cuda_graphs=True)
    for p in params:
        p.grad = torch.empty_like(p)
    for i in range(3):  # eager, then a graph built, then replayed
        for p in params:
            p.grad.normal_()
        with no_sync():
            tel.capture(step=i)
    assert tel.flush(10.0) and tel.stats()["graph_builds"] >= 1
    old = [p.grad for p in params]  # their memory is where the new gradients will lie
    for p in params:
        p.grad = None
    if change == "shrink":
        for p in params:
            p.data = p.data[: p.numel() // 2].clone()  # the same Parameter object
    else:
        model.to(getattr(torch, change))  # in place: the same Parameter objects
    for p, g in zip(params, old):
        p.grad = g.view(-1).view(p.dtype)[: p.numel()].view_as(p)
        p.grad.normal_()
        assert p.grad.data_ptr() == g.data_ptr()
    want = ref_sq(params)
    with no_sync():
        tel.capture(step=3)
    assert tel.flush(10.0)
    stats, result = tel.stats(), tel.latest()
    assert stats["errors"] == 0 and stats["plans"] == 2
    # float32 accumulation of at most 4,096 squares per block: relative error below 1e-6
    assert_close(result["host"].sq, want, 1e-5)


# --- the host does not wait for the GPU --------------------------------------------------------

# A call that waited for the training stream would take the 0.5 s it is kept busy. The bounds
# are the host time these calls take at most, with room for a loaded machine: a first graph
# build (capture and instantiate, a few kernels) takes milliseconds more than a replay.
BUSY_S = 0.5
REPLAY_BOUND_S = 0.02
FIRST_BUILD_BOUND_S = 0.05


def _timed(attach, how: str, tables: bool) -> list[tuple[float, bool, int]]:
    """Four steps, each timed while the training stream is still busy with half a second of
    sleep: (host seconds of the call, stream still busy after it, graphs built so far)."""
    model = HostSeeds().cuda()
    opt = scaler = None
    if how == "capture":
        tel = attach(model=model, host=model.host, seeds=SEEDS, pointer_tables=tables)
    elif how == "hooked_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        tel = attach(
            model=model, host=model.host, seeds=SEEDS, optimizer=opt, pointer_tables=tables
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cuda")
        tel = attach(
            model=model,
            host=model.host,
            seeds=SEEDS,
            optimizer=opt,
            scaler=scaler,
            pointer_tables=tables,
        )
    busy_for(0.001)  # calibration synchronizes: here, not in a timed step
    out = []
    for i in range(4):  # 0: plan, compile, eager pass; 1: first graph build; 2, 3: replays
        model.zero_grad(set_to_none=False)  # the same addresses: the _foreach_norm graph too
        x = torch.randn(32, 64, device="cuda")
        loss = model(x).float().pow(2).mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        busy = busy_for(BUSY_S)
        t0 = time.perf_counter()
        if how == "capture":
            tel.capture(step=i)
        elif scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        seconds = time.perf_counter() - t0
        out.append((seconds, not busy.query(), tel.stats()["graph_builds"]))
        torch.cuda.synchronize()
    assert tel.flush(10.0) and tel.stats()["errors"] == 0
    return out


@pytest.mark.parametrize("tables", KERNELS)
@pytest.mark.parametrize("how", ["capture", "hooked_step", "fused_scaler_step"])
def test_the_host_does_not_wait_for_a_busy_training_stream(attach, how, tables):
    """Not relying on sync-debug mode (which sees only the syncs torch reports): the call
    returns while the stream is still busy, on a first graph build and on replays."""
    steps = _timed(attach, how, tables)
    assert steps[0][2] == 0 and steps[1][2] >= 1  # step 1 built the first graph
    for i, (seconds, still_busy, _) in enumerate(steps[1:], start=1):
        bound = FIRST_BUILD_BOUND_S if i == 1 else REPLAY_BOUND_S
        assert still_busy and seconds < bound, (how, i, seconds, still_busy, steps)
