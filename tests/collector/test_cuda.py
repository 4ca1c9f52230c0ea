"""The collector on CUDA: correctness, mixed devices, live re-binding, no syncs, no races.

Every test compares against a float64 reference computed on the CPU from the gradients as
they were at capture time, and runs ``capture()`` (or the optimizer step) under
``torch.cuda.set_sync_debug_mode("error")`` with ``stats()["errors"] == 0`` asserted, since
the collector turns internal failures (a sync raised by debug mode included) into counts.
Skipped cleanly without CUDA. Run once more under TORCH_CUDA_SANITIZER=1 on a GPU machine
(tools/gpu-check.sh: the "eager and foreach" variants, whose reads the sanitizer can see).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import zmq
from cuda_support import (
    GRAPH_MODES,
    KERNELS,
    PASSES,
    HostSeeds,
    assert_close,
    no_sync,
    ref_sq,
)
from cuda_support import attach_host_seeds as attach
from cuda_support import train_step as step

import esper_telemetry as et

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def pull():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(0)
    ctx.term()


def drain(sock, timeout_s: float = 2.0) -> list[object]:
    events: list[object] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            events.extend(et.decode(sock.recv()))
        elif events:
            break
    return events


@pytest.mark.parametrize("tables", KERNELS)
@pytest.mark.parametrize("graphs", GRAPH_MODES)
@pytest.mark.parametrize(
    "dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-3)]
)
def test_norms_match_float64_reference_without_sync(pull, graphs, tables, dtype, rel):
    sock, endpoint = pull
    model = HostSeeds(dtype=dtype).cuda()
    tel = attach(model, endpoint, cuda_graphs=graphs, pointer_tables=tables)
    want: dict[int, dict[str, float]] = {}
    for i in range(5):  # the third capture onwards replays a graph in graph mode
        model.zero_grad(set_to_none=False)
        step(model, "cuda", dtype)
        want[i] = {
            "host": ref_sq(model.host.parameters()),
            "a": ref_sq(model.seeds["a"].parameters()),
            "b": ref_sq(model.seeds["b"].parameters()),
        }
        with no_sync():
            tel.capture(step=i)
    assert tel.flush(10.0)
    stats = tel.stats()
    tel.close()
    assert stats["errors"] == 0 and stats["completed"] == 5
    if graphs:
        assert stats["graph_replays"] >= 3
    norms = [e for e in drain(sock) if isinstance(e, et.Norms)]
    assert [e.step for e in norms] == list(range(5))
    for e in norms:
        got = {g.name: g.sq for g in e.groups}
        for name, sq in want[e.step].items():
            assert_close(got[name], sq, rel)


def test_pointer_table_graph_serves_moving_gradients(pull):
    """zero_grad(set_to_none=True) every step: new addresses, yet one graph replayed throughout."""
    pytest.importorskip("triton")
    sock, endpoint = pull
    model = HostSeeds().cuda()
    tel = attach(model, endpoint)
    want = {}
    for i in range(8):
        model.zero_grad(set_to_none=True)
        step(model, "cuda")
        want[i] = ref_sq(model.host.parameters())
        with no_sync():
            tel.capture(step=i)
    assert tel.flush(10.0)
    stats = tel.stats()
    tel.close()
    assert stats["errors"] == 0 and stats["pointer_tables"] == 1
    assert stats["plans"] == 1 and stats["graph_builds"] == 1 and stats["graph_replays"] == 7
    norms = [e for e in drain(sock) if isinstance(e, et.Norms)]
    assert [e.step for e in norms] == list(range(8))
    for e in norms:
        assert_close(next(g.sq for g in e.groups if g.name == "host"), want[e.step], 1e-5)


def test_nonfinite_counted_without_sync(pull):
    sock, endpoint = pull
    model = HostSeeds().cuda()
    tel = attach(model, endpoint)
    step(model, "cuda")
    model.host[0].weight.grad[0, 0] = float("nan")
    model.host[2].bias.grad[1] = float("inf")
    with no_sync():
        tel.capture(step=0)
    assert tel.flush(10.0)
    result = tel.latest()
    errors = tel.stats()["errors"]
    tel.close()
    assert errors == 0
    assert result["host"].nonfinite == 2 and result["a"].nonfinite == 0
    norms = [e for e in drain(sock) if isinstance(e, et.Norms)]
    host = next(g for g in norms[0].groups if g.name == "host")
    assert host.nonfinite == 2 and math.isnan(host.sq)  # travels as is, beside its count


def test_mixed_devices_measured_and_reported(pull):
    """The seed bug: one group spans the CPU and CUDA, and seeds live apart from the host.

    Groups other than the host are disjoint, so ``split`` takes seed b's weight (no seed of
    its own here) and one host weight; the host is measured without that one."""
    sock, endpoint = pull
    model = HostSeeds()
    model.seeds.cuda()  # both seeds on CUDA, the host on the CPU
    split = [model.host[0].weight, model.seeds["b"].weight]  # one group on two devices
    tel = et.attach(
        model=model,
        host=model.host,
        seeds={"a": "seeds.a"},
        groups={"split": split},
        run="mixed",
        endpoint=endpoint,
    )
    x = torch.randn(8, 64)
    h = model.host[1](model.host[0](x))
    seeds_in = h.detach().cuda()
    loss = model.host[2](h).pow(2).mean().cuda()
    for seed in model.seeds.values():
        loss = loss + seed(seeds_in).pow(2).mean()
    loss.backward()
    host_own = [p for p in model.host.parameters() if p is not model.host[0].weight]
    want = {
        "host": ref_sq(host_own),  # host[0].weight is counted in split only
        "a": ref_sq(model.seeds["a"].parameters()),
        "split": ref_sq(split),
    }
    assert all(p.grad is not None for p in split) and want["split"] > 0
    with no_sync():
        tel.capture(step=0)
    assert tel.flush(10.0)
    result, errors = tel.latest(), tel.stats()["errors"]
    tel.close()
    assert errors == 0
    for name, sq in want.items():
        assert_close(result[name].sq, sq, 1e-5)
    assert result["host"].params == sum(p.numel() for p in host_own)
    devices = [e for e in drain(sock) if isinstance(e, et.DeviceMismatch)]
    kinds = {(e.kind, e.group): e.devices for e in devices}
    assert kinds[("split", "split")] == ("cpu", "cuda:0")
    assert kinds[("mixed", "a")] == ("cuda:0",)


def test_to_device_after_attach_is_followed(pull):
    """FEAT-006: attach on the CPU, move to CUDA, and the next capture measures the new tensors."""
    sock, endpoint = pull
    model = HostSeeds()
    tel = attach(model, endpoint)
    step(model, "cpu")
    tel.capture(step=0)
    model.zero_grad(set_to_none=True)
    model.cuda()
    step(model, "cuda")
    want = ref_sq(model.host.parameters())
    with no_sync():
        tel.capture(step=1)
    assert tel.flush(10.0)
    result, errors = tel.latest(), tel.stats()["errors"]
    tel.close()
    assert errors == 0
    assert result.step == 1 and result["host"].sq > 0
    assert_close(result["host"].sq, want, 1e-5)
    moved = [e for e in drain(sock) if isinstance(e, et.DeviceMismatch) and e.kind == "moved"]
    assert sorted(e.group for e in moved) == ["a", "b", "host"]
    assert all(e.devices == ("cuda:0",) for e in moved)


# --- races: big tensors so the side stream is still reading when training writes ------------


class Big(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.host = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(1 << 24)) for _ in range(8)]
        )
        self.seed = torch.nn.Parameter(torch.zeros(1 << 20))


def big_grads(model: Big, value: float) -> float:
    for p in list(model.host) + [model.seed]:
        p.grad = torch.full_like(p, value)
    return ref_sq(model.host.parameters())


@pytest.mark.parametrize("tables", KERNELS)
@pytest.mark.parametrize("graphs", GRAPH_MODES)
@pytest.mark.parametrize("write", ["clip", "zero_inplace", "free_and_reuse", "scale_inplace"])
def test_capture_reads_gradients_as_they_were(pull, graphs, tables, write):
    sock, endpoint = pull
    model = Big().cuda()
    tel = et.attach(
        host=model.host.parameters(),
        seeds={"s": [model.seed]},
        run="race",
        endpoint=endpoint,
        cuda_graphs=graphs,
        pointer_tables=tables,
    )
    wants = []
    for i in range(4):
        wants.append(big_grads(model, 0.5 + i))
        with no_sync():
            tel.capture(step=i)
            # Training goes on writing the gradients at once, on its own stream.
            if write == "clip":
                torch.nn.utils.clip_grad_norm_(model.host.parameters(), 1e-3, foreach=True)
            elif write == "zero_inplace":
                for p in model.host:
                    p.grad.zero_()
            elif write == "scale_inplace":
                torch._foreach_mul_([p.grad for p in model.host], 1e3)
            else:  # zero_grad(set_to_none=True), then new tensors likely in the freed blocks
                for p in model.host:
                    p.grad = None
                junk = [torch.full((1 << 24,), 7.0, device="cuda") for _ in range(8)]
                del junk
    assert tel.flush(20.0)
    errors = tel.stats()["errors"]
    tel.close()
    assert errors == 0
    norms = [e for e in drain(sock, 5.0) if isinstance(e, et.Norms)]
    assert [e.step for e in norms] == [0, 1, 2, 3]
    for e in norms:
        host = next(g for g in e.groups if g.name == "host")
        assert_close(host.sq, wants[e.step], 1e-5)


@pytest.mark.parametrize("graphs,tables", PASSES)
def test_staging_buffers_are_not_reused_early(pull, graphs, tables):
    """Many captures queued back to back: each one's numbers are its own."""
    sock, endpoint = pull
    model = Big().cuda()
    tel = et.attach(
        host=model.host.parameters(),
        run="staging",
        endpoint=endpoint,
        cuda_graphs=graphs,
        pointer_tables=tables,
    )
    wants = {}
    with no_sync():
        for i in range(24):
            for p in model.host:
                p.grad = (
                    torch.full_like(p, float(i + 1))
                    if p.grad is None
                    else p.grad.fill_(float(i + 1))
                )
            wants[i] = 8 * (1 << 24) * float(i + 1) ** 2
            tel.capture(step=i)
    assert tel.flush(20.0)
    errors = tel.stats()["errors"]
    tel.close()
    assert errors == 0
    norms = [e for e in drain(sock, 5.0) if isinstance(e, et.Norms)]
    assert sorted(e.step for e in norms) == list(range(24))
    for e in norms:
        assert_close(e.groups[0].sq, wants[e.step], 1e-5)


@pytest.mark.parametrize("graphs,tables", PASSES)
def test_optimizer_hooks_without_sync(pull, graphs, tables):
    sock, endpoint = pull
    model = HostSeeds().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = attach(model, endpoint, optimizer=opt, every=2, cuda_graphs=graphs, pointer_tables=tables)
    wants = {}
    for i in range(6):
        opt.zero_grad(set_to_none=True)
        step(model, "cuda")
        wants[i] = ref_sq(model.host.parameters())
        with no_sync():
            opt.step()
            torch.nn.utils.clip_grad_norm_(
                model.parameters(), 1e-3, foreach=True
            )  # after the fence
    assert tel.flush(10.0)
    errors = tel.stats()["errors"]
    tel.close()
    assert errors == 0
    norms = [e for e in drain(sock) if isinstance(e, et.Norms)]
    assert [e.step for e in norms] == [0, 2, 4]
    for e in norms:
        assert_close(next(g.sq for g in e.groups if g.name == "host"), wants[e.step], 1e-5)


def test_gradscaler_skipped_step_is_reported(pull):
    sock, endpoint = pull
    model = HostSeeds().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    tel = attach(model, endpoint, optimizer=opt, scaler=scaler)
    for i in range(3):
        opt.zero_grad()
        x = torch.randn(8, 64, device="cuda")
        if i == 1:
            x[0, 0] = float("inf")
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(opt)  # GradScaler itself synchronizes here; the collector does not
        scaler.update()
    assert tel.flush(10.0)
    errors = tel.stats()["errors"]
    tel.close()
    assert errors == 0
    norms = [e for e in drain(sock) if isinstance(e, et.Norms)]
    assert [(e.step, e.skipped) for e in norms] == [(0, False), (1, True), (2, False)]
    host = next(g for g in norms[1].groups if g.name == "host")
    assert host.nonfinite > 0


@pytest.mark.parametrize("unscale_first", [False, True])
def test_fused_optimizer_under_gradscaler_reports_skips_unscaled(pull, unscale_first):
    """A fused AdamW is stepped by GradScaler even when it skips (inside its kernel); the
    skip is found_inf on the device, read with the capture's results, not by the host. It
    unscales the gradients in place inside step() unless the user did (capture in the
    post-hook); a skipped step leaves them scaled, and the report still carries the unscaled
    squares. The same logic on the CPU: test_optimizer_path.py."""
    sock, endpoint = pull
    model = HostSeeds().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    tel = attach(model, endpoint, optimizer=opt, scaler=scaler)
    wants, bad = {}, 1
    for i in range(3):
        opt.zero_grad()
        x = torch.randn(32, 64, device="cuda")
        scaler.scale(model(x).float().pow(2).mean()).backward()
        scale = scaler.get_scale()
        if i == bad:
            model.seeds["b"].weight.grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
            scale = 1.0
        wants[i] = {
            name: ref_sq(module.parameters()) / scale**2
            for name, module in (("host", model.host), ("a", model.seeds["a"]))
        }
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert moved == (i != bad)  # the fused kernel really skipped that step
    assert tel.flush(10.0)
    errors = tel.stats()["errors"]
    tel.close()
    assert errors == 0
    norms = [e for e in drain(sock) if isinstance(e, et.Norms)]
    assert [(e.step, e.skipped) for e in norms] == [(0, False), (1, True), (2, False)]
    for e in norms:
        wire = {g.name: g for g in e.groups}
        for name, want in wants[e.step].items():
            assert_close(wire[name].sq, want, 1e-5)
        assert wire["b"].nonfinite == (1 if e.step == bad else 0)


def test_isolated_group_gradient_is_a_violation(pull):
    sock, endpoint = pull
    model = HostSeeds().cuda()
    tel = attach(model, endpoint, isolated=("a",))
    step(model, "cuda")  # seed a gets gradient although declared isolated
    with no_sync():
        tel.capture(step=0)
    assert tel.flush(10.0)
    tel.close()
    violations = [e for e in drain(sock) if isinstance(e, et.IsolationViolation)]
    assert [(v.group, v.kind) for v in violations] == [("a", "gradient")]
    assert_close(violations[0].value ** 2, ref_sq(model.seeds["a"].parameters()), 1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_group_across_two_gpus(pull):
    sock, endpoint = pull
    a = torch.nn.Linear(64, 64).to("cuda:0")
    b = torch.nn.Linear(64, 64).to("cuda:1")
    tel = et.attach(host=list(a.parameters()) + list(b.parameters()), run="2gpu", endpoint=endpoint)
    a(torch.randn(4, 64, device="cuda:0")).sum().backward()
    b(torch.randn(4, 64, device="cuda:1")).sum().backward()
    want = ref_sq(list(a.parameters()) + list(b.parameters()))
    with no_sync():
        tel.capture(step=0)
    assert tel.flush(10.0)
    result = tel.latest()
    tel.close()
    assert_close(result["host"].sq, want, 1e-5)
