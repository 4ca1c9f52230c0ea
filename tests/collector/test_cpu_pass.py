"""The CPU pass: its plan kept across re-allocated gradients, exact values whatever moves
underneath it (new addresses, shapes, gradients gained or lost, dtypes changed in place),
and the helper threads that take shares of it: exact, bounded, never raising into training."""

from __future__ import annotations

import logging
import math
import threading

import pytest
import torch
from collector_support import make_model, ref_sq, rel_err, train_step
from torch import nn
from trainer_support import tiny_gpt2

import esper_telemetry.collector.cpu_threads as cpu_threads
from esper_telemetry.collector.norms import sq_error_bound
from esper_telemetry.collector.plan import DOT_MIN_ELEMENTS, MIN_SHARE_COST, TENSOR_COST_ELEMENTS

# tensors of 6 elements: this many make one share's worth of work
SHARE = MIN_SHARE_COST // (TENSOR_COST_ELEMENTS + 6) + 1


def _bound(params):
    """How far the pass's figure for these parameters' gradients may be from the float64
    reference: the largest tensor bound (``norms.sq_error_bound``), plus a float64 rounding
    per tensor for the group's sum."""
    grads = [p.grad for p in params if p.grad is not None]
    return max(sq_error_bound(g.numel(), g.dtype) for g in grads) + len(grads) * 2.0**-53


def _groups(model):
    return {
        "host": list(model.host.parameters()),
        "a": list(model.seeds["a"].parameters()),
        "b": list(model.seeds["b"].parameters()),
    }


def _check(tel, model, step, tol=1e-6):
    assert tel.flush(5.0)
    res = tel.latest()
    assert res is not None and res.step == step
    for name, ps in _groups(model).items():
        want = ref_sq(ps)
        got = res.groups[name]
        if want is None:
            assert got.sq is None and got.has_grad is False, name
        else:
            assert got.has_grad and rel_err(got.sq, want) <= tol, (name, got.sq, want)
    return res


def test_set_to_none_keeps_one_plan_and_exact_values(attach):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    addresses = set()
    for step in range(8):
        opt.zero_grad(set_to_none=True)  # every gradient a new tensor, wherever malloc puts it
        train_step(model, seed=step)
        for p in model.parameters():  # and for certain at new addresses
            p.grad = p.grad.clone()
        addresses.add(tuple(p.grad.data_ptr() for p in model.parameters()))
        tel.capture(step=step)
        _check(tel, model, step)
        opt.step()
    assert len(addresses) > 1
    st = tel.stats()
    assert st["plans"] == 1 and st["errors"] == 0 and st["completed"] == 8


def test_gradients_gained_lost_and_reshaped_are_measured_exactly(attach):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)
    tel.capture(step=0)
    _check(tel, model, 0)
    model.seeds["b"].zero_grad(set_to_none=True)  # a seed sits out: its gradients are gone
    tel.capture(step=1)
    res = _check(tel, model, 1)
    assert res.groups["b"].has_grad is False and res.groups["a"].has_grad is True
    train_step(model, seed=1)  # ... and back
    tel.capture(step=2)
    _check(tel, model, 2)
    assert tel.stats()["plans"] == 2  # two layouts, the first found again
    # A parameter's storage replaced by one of another shape (in place, no re-registration):
    # the plan does not depend on shapes; the values still must be exact.
    w = next(model.host.parameters())
    w.data = torch.randn(w.shape[0] + 3, *w.shape[1:])
    w.grad = torch.randn_like(w)
    tel.capture(step=3)
    _check(tel, model, 3)
    assert tel.stats()["errors"] == 0


def test_dtype_changed_in_place_refits_the_plan_exactly(attach):
    """model.double() rewrites .data and .grad.data of the same objects: no rebinding is seen."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)
    tel.capture(step=0)
    _check(tel, model, 0)
    model.double()
    assert next(model.parameters()).grad.dtype == torch.float64
    for p in model.parameters():  # values float32 cannot hold: a float32 pass would be off
        p.grad.add_(1e-9)
    tel.capture(step=1)
    _check(tel, model, 1, tol=1e-12)
    model.float()  # back: the first plan again
    tel.capture(step=2)
    _check(tel, model, 2)
    st = tel.stats()
    assert st["errors"] == 0 and st["plans"] == 2


def test_a_gradient_moved_to_another_device_in_place_is_not_read_there(attach):
    """A CPU plan's pass refuses a gradient on another device (meta here: no data to read)."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)
    tel.capture(step=0)
    _check(tel, model, 0)
    w = next(model.seeds["a"].parameters())
    torch.utils.swap_tensors(w, nn.Parameter(torch.empty(w.shape, device="meta")))  # same object
    w.grad = torch.empty_like(w)
    tel.capture(step=1)  # must not raise: counted, and no number made up
    assert tel.flush(5.0)
    assert tel.stats()["errors"] == 1 and tel.latest().step == 0


class _Many(nn.Module):
    """``n`` small parameters, each in its own module, in a host and one seed; ``big`` more
    in the host large enough for a ``torch.dot`` run (after the small ones)."""

    def __init__(self, n: int, big: int = 0) -> None:
        super().__init__()
        self.host = nn.ModuleList(
            [nn.Linear(3, 2, bias=False) for _ in range(n - 8)]
            + [nn.Linear(256, DOT_MIN_ELEMENTS // 256, bias=False) for _ in range(big)]
        )
        self.seed = nn.ModuleList([nn.Linear(3, 2, bias=False) for _ in range(8)])


def test_helper_threads_share_the_pass_exactly(attach, monkeypatch, thread_names):
    monkeypatch.setattr(
        cpu_threads, "usable_cores", lambda: 3
    )  # two helpers, whatever this machine has
    n = 3 * SHARE + 10
    model = _Many(n, big=3)
    for i in range(0, n - 8, 97):  # a float64 bucket in the host, beside the float32 one
        model.host[i].double()
    model.host[-1].double()  # and a float64 torch.dot run
    for i, p in enumerate(model.parameters()):
        # each tensor about 1/n of its group: one left out or counted twice shows at 1e-4
        p.grad = torch.full_like(p, 1 + i % 7)
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    for step in range(3):
        tel.capture(step=step)
        assert tel.flush(5.0)
        res = tel.latest()
        assert rel_err(res.groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-6
        assert rel_err(res.groups["s"].sq, ref_sq(model.seed.parameters())) <= 1e-6
        assert res.groups["host"].nonfinite == 0
    last = list(model.host.parameters())[-1]  # in the last share: counted as non-finite there
    last.grad[0, 0] = float("nan")
    tel.capture(step=3)
    assert tel.flush(5.0) and tel.latest().groups["host"].nonfinite == 1
    plan = tel._plans.current
    assert len(plan.cpu.shares) == 3 and tel._passes.helpers.count == 2
    assert len(plan.cpu.buckets) == 2  # float32 and float64
    runs = [(dtype, dot) for share in plan.cpu.shares for dtype, _, _, dot in share]
    assert (
        (torch.float32, True) in runs
        and (torch.float64, True) in runs
        and (torch.float32, False) in runs
    )
    # torch.dot runs stay with the training thread (MKL's threads, started from a helper thread,
    # fight its own)
    assert all(not dot for share in plan.cpu.shares[1:] for _, _, _, dot in share)
    covered = sorted((a, b) for share in plan.cpu.shares for _, a, b, _ in share)
    assert covered[0][0] == 0 and covered[-1][1] == n + 3
    assert all(b == c for (_, b), (c, _) in zip(covered, covered[1:]))  # no gap, no overlap
    names = thread_names()
    assert "esper-telemetry-norms-0" in names and "esper-telemetry-norms-1" in names
    tel.close()
    for t in threading.enumerate():
        if t.name.startswith("esper-telemetry-norms"):
            t.join(2.0)
    assert not [t for t in thread_names() if t.startswith("esper-telemetry-norms")]


def test_a_failing_helper_share_is_counted_not_raised(attach, monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    model = _Many(2 * SHARE + 8)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    real = cpu_threads.tensor_squares
    training = threading.get_ident()

    def helper_fails(tensors, buckets):
        if threading.get_ident() != training:
            raise RuntimeError("helper exploded")
        return real(tensors, buckets)

    monkeypatch.setattr(cpu_threads, "tensor_squares", helper_fails)
    tel.capture(step=0)  # must not raise
    assert tel.flush(5.0) and tel.stats()["errors"] == 1 and tel.latest() is None
    monkeypatch.setattr(cpu_threads, "tensor_squares", real)
    tel.capture(step=1)  # the helpers still serve
    assert tel.flush(5.0) and tel.latest().step == 1
    assert rel_err(tel.latest().groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-6
    assert not tel._passes.helpers.broken


def test_a_stuck_helper_costs_one_bounded_wait_then_none_is_used(attach, monkeypatch, caplog):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu_threads, "WAIT_S", 0.2)
    model = _Many(2 * SHARE + 8)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    real = cpu_threads.tensor_squares
    training = threading.get_ident()
    release = threading.Event()

    def helper_hangs(tensors, buckets):
        if threading.get_ident() != training:
            release.wait(10.0)
        return real(tensors, buckets)

    monkeypatch.setattr(cpu_threads, "tensor_squares", helper_hangs)
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        import time

        t0 = time.monotonic()
        tel.capture(step=0)
        waited = time.monotonic() - t0
        tel.capture(step=1)  # no helper any more: no wait
        second = time.monotonic() - t0 - waited
    release.set()
    assert 0.2 <= waited < 2.0 and second < 0.2
    assert tel._passes.helpers.broken
    assert tel.flush(5.0) and tel.latest().step == 1 and tel.stats()["errors"] == 0
    assert rel_err(tel.latest().groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-6
    assert len([r for r in caplog.records if "did not answer" in r.getMessage()]) == 1


@pytest.mark.parametrize("cores", [1])
def test_no_helper_on_one_core(attach, monkeypatch, thread_names, cores):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)
    model = _Many(4 * SHARE)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    tel.capture(step=0)
    assert (
        tel.flush(5.0)
        and rel_err(tel.latest().groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-6
    )
    assert len(tel._plans.current.cpu.shares) == 1
    assert not [t for t in thread_names() if t.startswith("esper-telemetry-norms")]


def test_cpu_results_arrive_without_a_flush_soon_after_each_capture(attach, monkeypatch):
    """A CPU capture does not wake the completion thread while it polls; it still shows up."""
    import time

    from esper_telemetry.collector import completion

    monkeypatch.setattr(completion, "_LAZY_WINDOW_S", 0.3)
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)

    def seen(step, within_s):
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            res = tel.latest()
            if res is not None and res.step == step:
                return time.monotonic() - (deadline - within_s)
            time.sleep(0.001)
        raise AssertionError(f"step {step} not seen within {within_s}s")

    tel.capture(step=0)  # the thread is idle: woken at once
    seen(0, 0.2)
    for step in (1, 2, 3):  # polling: taken at its next look (10 ms)
        tel.capture(step=step)
        assert seen(step, 0.2) < 0.2
    time.sleep(0.5)  # past the window: back to waiting, woken again
    assert not tel._completion._polling
    tel.capture(step=4)
    seen(4, 0.2)
    assert tel.stats()["completed"] == 5 and tel.stats()["errors"] == 0


@pytest.mark.parametrize("to", [torch.float64, torch.bfloat16])
def test_large_tensors_follow_a_dtype_changed_in_place(attach, to):
    """A large run refuses another dtype (it would read it otherwise): the plan is refit."""
    model = _Many(16, big=2)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 1 + i % 5) / 3
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    tel.capture(step=0)
    assert tel.flush(5.0)
    assert any(dot for _, _, _, dot in tel._plans.current.cpu.shares[0])
    # 32,768 equal float32 values a tensor (MKL's float32 dot was 1.2e-5 off on AMD): rows
    assert rel_err(tel.latest().groups["host"].sq, ref_sq(model.host.parameters())) <= _bound(
        model.host.parameters()
    )
    model.to(to)  # .data and .grad.data of the same objects
    for p in model.parameters():
        p.grad.mul_(1 + 1e-9)
    tel.capture(step=1)
    assert tel.flush(5.0) and tel.latest().step == 1
    tol = _bound(model.host.parameters())
    assert tol < (1e-11 if to == torch.float64 else 2e-5)  # norms within 1e-5 (README)
    assert rel_err(tel.latest().groups["host"].sq, ref_sq(model.host.parameters())) <= tol
    assert tel.stats()["errors"] == 0 and tel.stats()["plans"] == 2


def test_shares_keep_large_tensors_on_the_training_thread_and_cover_every_tensor():
    from esper_telemetry.collector.plan import split_shares

    big, small = DOT_MIN_ELEMENTS, 100
    # float32: 2 large (dot) then 1000 small; bfloat16: 1 large (no dot) then 1000 small
    numels = [big] * 2 + [small] * 1000 + [big] + [small] * 1000
    runs = [
        (torch.float32, 0, 2, True),
        (torch.float32, 2, 1002, False),
        (torch.bfloat16, 1002, 1003, False),
        (torch.bfloat16, 1003, 2003, False),
    ]
    shares = split_shares(numels, runs, 3)
    assert len(shares) == 3
    first = shares[0]
    assert (torch.float32, 0, 2, True) in first and (torch.bfloat16, 1002, 1003, False) in first
    for share in shares[1:]:
        assert all(not dot and numels[a] < big for _, a, _, dot in share)
    covered = sorted((a, b) for share in shares for _, a, b, _ in share)
    assert covered[0][0] == 0 and covered[-1][1] == len(numels)
    assert all(b == c for (_, b), (c, _) in zip(covered, covered[1:]))
    for share in shares:  # a run never mixes dtypes
        for dtype, a, b, _ in share:
            assert all((i < 1002) == (dtype == torch.float32) for i in range(a, b))
    assert split_shares([small] * 10, [(torch.float32, 0, 10, False)], 3) == [
        [(torch.float32, 0, 10, False)]
    ]


def test_shares_cut_large_tensors_read_in_rows_when_every_thread_reads_alone():
    from esper_telemetry.collector.plan import split_shares

    big = 4 * DOT_MIN_ELEMENTS + 77
    # float32 and bfloat16 read in rows, float64 by MKL's dot, then small float32 ones
    numels = [big] * 40 + [big] * 20 + [big] * 4 + [100] * 500
    runs = [
        (torch.float32, 0, 40, True),
        (torch.bfloat16, 40, 60, True),
        (torch.float64, 60, 64, True),
        (torch.float32, 64, 564, False),
    ]
    shares = split_shares(numels, runs, 3, share_rows=True)
    assert len(shares) == 3
    assert (torch.float64, 60, 64, True) in shares[0]  # MKL threads its own: the caller's
    rows_by_share = [
        sum(b - a for dtype, a, b, large in share if large and dtype != torch.float64)
        for share in shares
    ]
    assert all(n > 0 for n in rows_by_share[1:]) and sum(rows_by_share) == 60
    costs = [
        sum(numels[i] + TENSOR_COST_ELEMENTS for _, a, b, _ in share for i in range(a, b))
        for share in shares
    ]
    assert max(costs) < 1.5 * min(costs)  # about equal, float64 included
    covered = sorted((a, b, large) for share in shares for _, a, b, large in share)
    assert covered[0][0] == 0 and covered[-1][1] == len(numels)
    assert all(b == c for (_, b, _), (c, _, _) in zip(covered, covered[1:]))
    for a, b, large in covered:  # a piece of a run is read as the run is
        assert large == (a < 64) and all((i < 64) == large for i in range(a, b))
    for share in shares:
        for dtype, a, b, _ in share:
            assert all(dtype == next(r[0] for r in runs if r[1] <= i < r[2]) for i in range(a, b))
    # without it, as before: rows stay with the caller
    assert all(not large for share in split_shares(numels, runs, 3)[1:] for _, _, _, large in share)
    # work for two threads of four: rows stay with the caller, read by torch's threads
    assert split_shares([65_536] * 80, [(torch.float32, 0, 80, True)], 4, True) == [
        [(torch.float32, 0, 80, True)]
    ]
    # a cut falls at the tensor whose middle is nearest (three of 10 M, then small ones)
    numels = [10_000_000] * 3 + [1000] * 3000
    runs = [(torch.float32, 0, 3, True), (torch.float32, 3, 3003, False)]
    shares = split_shares(numels, runs, 4, True)
    costs = [
        sum(numels[i] + TENSOR_COST_ELEMENTS for _, a, b, _ in share for i in range(a, b))
        for share in shares
    ]
    assert len(shares) == 4 and max(costs) < 1.5 * min(costs), costs


@pytest.fixture
def odd_count():
    """This (the training) thread's OpenMP count set to one it had not, given back after; the
    collector must leave it so. Skips where torch's intra-op work is not on OpenMP."""
    omp = cpu_threads._openmp()
    if omp is None:
        pytest.skip("torch runs its intra-op work elsewhere than on OpenMP here")
    original = omp.get()
    omp.set(original + 1)
    try:
        yield original + 1
    finally:
        omp.set(original)


def test_one_openmp_thread_holds_inside_and_gives_the_count_back_even_on_error(odd_count):
    with pytest.raises(ZeroDivisionError), cpu_threads.one_openmp_thread():
        assert torch.get_num_threads() == 1
        1 / 0  # noqa: B018
    assert torch.get_num_threads() == odd_count


def test_one_openmp_thread_on_a_thread_torch_has_not_used_yet():
    # Torch gives a thread its count (torch.set_num_threads') at its first parallel use: inside
    # the share, that would undo ours, and the thread would get OpenMP's default back after.
    if cpu_threads._openmp() is None:
        pytest.skip("torch runs its intra-op work elsewhere than on OpenMP here")
    original = torch.get_num_threads()
    torch.set_num_threads(original + 1)  # unlike OpenMP's default for a new thread
    seen: list[int] = []

    def fresh():
        with cpu_threads.one_openmp_thread():
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())

    try:
        thread = threading.Thread(target=fresh)
        thread.start()
        thread.join(10)
    finally:
        torch.set_num_threads(original)
    assert seen == [1, original + 1]


def test_large_tensors_are_read_alone_on_each_thread_and_exact(attach, monkeypatch, odd_count):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    seen: list[tuple[str, int, int]] = []
    real = cpu_threads.tensor_squares

    def recording(tensors, runs):
        rows = sum(b - a for dtype, a, b, large in runs if large)
        seen.append((threading.current_thread().name, torch.get_num_threads(), rows))
        return real(tensors, runs)

    monkeypatch.setattr(cpu_threads, "tensor_squares", recording)
    model = _Many(8, big=140)  # 140 large tensors, 4.6 M elements: two shares
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** float(torch.randint(-3, 3, ()))
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    for step in range(2):
        tel.capture(step=step)
        assert tel.flush(5.0) and tel.latest().step == step
    assert torch.get_num_threads() == odd_count
    shares = tel._plans.current.cpu.shares
    assert len(shares) == 2 and all(any(large for *_, large in share) for share in shares)
    threads = {name for name, _, rows in seen if rows}
    assert len(threads) == 2 and all(count == 1 for _, count, rows in seen if rows)
    for name, ps in (("host", model.host.parameters()), ("s", model.seed.parameters())):
        ps = list(ps)
        assert rel_err(tel.latest().groups[name].sq, ref_sq(ps)) <= _bound(ps), name
    assert tel.stats()["errors"] == 0


@pytest.mark.parametrize("why", ["no per-thread count", "more cores than threads"])
def test_otherwise_large_tensors_stay_on_the_training_thread_read_by_torchs_threads(
    attach, monkeypatch, why
):
    if why == "no per-thread count":
        monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
        monkeypatch.setattr(cpu_threads, "_openmp", lambda: None)
    else:  # 8 cores, 3 helpers: torch's own threads read a large tensor on more cores
        monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 8)
    counts: list[tuple[int, int]] = []
    real = cpu_threads.tensor_squares

    def recording(tensors, runs):
        counts.append((sum(b - a for _, a, b, large in runs if large), torch.get_num_threads()))
        return real(tensors, runs)

    monkeypatch.setattr(cpu_threads, "tensor_squares", recording)
    model = _Many(2 * SHARE + 8, big=140)  # small tensors enough for the helpers too
    for p in model.parameters():
        p.grad = torch.ones_like(p) / 3
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    tel.capture(step=0)
    assert tel.flush(5.0) and tel.stats()["errors"] == 0
    shares = tel._plans.current.cpu.shares
    assert len(shares) >= 2  # the helpers have small tensors to read
    assert all(not large for share in shares[1:] for *_, large in share)
    assert [n for rows, n in counts if rows] == [torch.get_num_threads()]  # not made one
    ps = list(model.host.parameters())
    assert rel_err(tel.latest().groups["host"].sq, ref_sq(ps)) <= _bound(ps)


def test_no_thread_to_be_had_means_no_helper_not_an_error(attach, monkeypatch, caplog):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    model = _Many(2 * SHARE + 8)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    monkeypatch.setattr(
        cpu_threads.threading, "Thread", NoThread
    )  # the helpers start at the first capture
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        for step in range(2):
            tel.capture(step=step)
    assert tel.flush(5.0) and tel.latest().step == 1 and tel.stats()["errors"] == 0
    assert rel_err(tel.latest().groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-6
    assert tel._passes.helpers.broken
    assert (
        len([r for r in caplog.records if "could not start a norm helper" in r.getMessage()]) == 1
    )


def test_a_seed_sitting_out_every_other_step_switches_plans_without_reading_layouts(
    attach, monkeypatch
):
    import esper_telemetry.collector.plancache as plancache

    calls = []
    real = plancache.grad_signature
    monkeypatch.setattr(plancache, "grad_signature", lambda grads: calls.append(1) or real(grads))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        train_step(model, seed=step)
        if step % 2:
            model.seeds["b"].zero_grad(set_to_none=True)  # b sits this step out
        tel.capture(step=step)
        res = _check(tel, model, step)
        assert res.groups["b"].has_grad is (step % 2 == 0)
    assert len(calls) == 2 and tel.stats()["plans"] == 2 and tel.stats()["errors"] == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e19])
def test_non_finite_large_tensors_are_counted_by_dot(attach, bad):
    """NaN, Inf and a sum of squares past float32's range (the accumulation type) are non-finite."""
    model = _Many(16, big=2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    tel.capture(step=0)
    assert tel.flush(5.0) and tel.latest().groups["host"].nonfinite == 0
    assert any(dot for _, _, _, dot in tel._plans.current.cpu.shares[0])
    model.host[-1].weight.grad[0, 0] = bad
    tel.capture(step=1)
    assert tel.flush(5.0)
    host = tel.latest().groups["host"]
    assert host.nonfinite == 1 and not math.isfinite(host.sq)
    assert tel.latest().groups["s"].nonfinite == 0


@pytest.mark.parametrize("with_counted", [False, True])
def test_small_passes_sum_in_python_to_the_same_float64_figures_as_the_torch_sums(with_counted):
    # The completion thread sums small CPU passes in Python (fewer torch calls, each of which
    # waits for the GIL beside a busy training thread): the same numbers, bit for bit.
    from esper_telemetry.collector.norms import group_sums, group_sums_list, squares

    g = torch.Generator().manual_seed(3)
    n, n_groups = 40, 5
    norms32 = torch.rand(20, generator=g) * 3
    norms32[4] = float("nan")
    norms32[7] = float("inf")
    dots64 = torch.rand(20, generator=g, dtype=torch.float64) * 1e6
    dots64[2] = float("inf")
    parts = [(20, dots64, True), (0, norms32, False)]  # any order, as the shares come back
    owners = torch.randint(0, n_groups, (n,), generator=g)
    counted = (torch.rand(n, generator=g) > 0.3) if with_counted else None
    want = group_sums(squares(parts), owners, n_groups, counted)
    got = group_sums_list(
        parts, owners.tolist(), n_groups, None if counted is None else counted.tolist()
    )
    got_t = torch.tensor(got, dtype=torch.float64)
    assert torch.equal(got_t.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got_t, nan=-1.0), torch.nan_to_num(want, nan=-1.0))


def test_cpu_captures_waiting_for_the_completion_thread_are_bounded_in_bytes(attach):
    # 2,000 gradient tensors: 4,096 waiting captures would hold 4,096 figures of 2,000
    # tensors (about 64 MB); the allowance is what fits in 8 MiB, past it captures are
    # skipped and counted as dropped.
    from esper_telemetry.collector.telemetry import _CPU_BACKLOG_BYTES, cpu_backlog

    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "host": nn.ParameterList([nn.Parameter(torch.randn(4)) for _ in range(1990)]),
            "seed": nn.ParameterList([nn.Parameter(torch.randn(4)) for _ in range(10)]),
        }
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    tel = attach(model=model, host="host", seeds={"seed": "seed"})
    gate = threading.Event()
    tel.capture(step=0)
    assert tel.flush(5.0)
    plan = tel._plans.current
    bound = cpu_backlog(plan)
    assert bound < 4096 and bound * 8 * 2000 <= _CPU_BACKLOG_BYTES
    held = tel._completion._on_done
    tel._completion._on_done = lambda pending: (gate.wait(30), held(pending))
    try:
        tries = bound + 300
        for step in range(1, tries + 1):
            tel.capture(step=step)
        # The first may already be taken by the (stopped) completion thread.
        assert bound <= tel._completion.in_flight() + 1 <= bound + 1
        assert tel.stats()["dropped"] >= tries - bound - 1
    finally:
        gate.set()
    assert tel.flush(30.0)
    assert tel.stats()["errors"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gpt2_reads_its_large_tensors_on_both_threads_exactly(
    attach, monkeypatch, odd_count, dtype
):
    # What people run: GPT-2 from a config (tied embeddings), new gradients every step; big
    # enough (7 M elements) for large tensors on the training thread and a helper.
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    model = tiny_gpt2(0, n_layer=4, n_embd=256, n_head=4, vocab_size=8000, n_positions=64)
    model = model.to(dtype)
    seed = model.transformer.h[3].mlp
    tel = attach(host=model, seeds={"mlp": seed})
    in_seed = set(map(id, seed.parameters()))
    for step in range(3):
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(step))
        model(ids, labels=ids).loss.backward()
        tel.capture(step=step)
        assert tel.flush(5.0) and tel.latest().step == step
        assert torch.get_num_threads() == odd_count
        for name, ps in (
            ("host", [p for p in model.parameters() if id(p) not in in_seed]),
            ("mlp", list(seed.parameters())),
        ):
            got = tel.latest().groups[name]
            assert got.params == sum(p.numel() for p in ps)  # tied weights once
            assert rel_err(got.sq, ref_sq(ps)) <= _bound(ps), (name, step)
    assert tel._plans.current.cpu.rows_alone and tel.stats()["errors"] == 0
