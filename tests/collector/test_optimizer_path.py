"""The optimizer path: captures in the step pre-hook every ``every`` steps, before the
optimizer touches anything, and GradScaler's skipped steps reported rather than lost."""

from __future__ import annotations

import math

import pytest
import torch
from collector_support import make_model, ref_sq, rel_err, train_step

from esper_telemetry import Norms


class ClippingSGD(torch.optim.Optimizer):
    """SGD that halves the gradients in place inside step(): a capture taken after the
    optimizer started would see a quarter of the squared norm."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(0.5)
                    p.add_(p.grad, alpha=-group["lr"])


def _refs(model):
    return {
        "host": ref_sq(model.host.parameters()),
        "a": ref_sq(model.seeds["a"].parameters()),
        "b": ref_sq(model.seeds["b"].parameters()),
    }


def test_captures_every_nth_step_before_the_optimizer_runs(attach, pull):
    model = make_model()
    opt = ClippingSGD(model.parameters())
    tel = attach(
        model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"}, optimizer=opt, every=2
    )
    refs = {}
    for step in range(5):
        opt.zero_grad()
        train_step(model, seed=step)
        refs[step] = _refs(model)
        opt.step()
        assert (
            rel_err(ref_sq(model.host.parameters()), refs[step]["host"] / 4) <= 1e-6
        )  # it did clip
    assert tel.flush(5.0)
    assert tel.latest().step == 4
    assert tel.stats()["captures"] == 3
    tel.close()
    opt.zero_grad()
    train_step(model, seed=9)
    opt.step()  # hooks removed at close: no capture
    norms = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    assert [n.step for n in norms] == [0, 2, 4]
    for n in norms:
        assert n.skipped is False
        for g in n.groups:
            assert rel_err(g.sq, refs[n.step][g.name]) <= 1e-5, (n.step, g.name)


def _scaler_or_skip():
    try:
        scaler = torch.amp.GradScaler("cpu")
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') unavailable: {exc}")
    if not scaler.is_enabled():  # pragma: no cover
        pytest.skip("GradScaler('cpu') is disabled in this torch build")
    return scaler


def test_gradscaler_skipped_step_is_reported(attach, pull):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = _scaler_or_skip()
    tel = attach(
        model=model,
        host="host",
        seeds={"a": "seeds.a", "b": "seeds.b"},
        optimizer=opt,
        scaler=scaler,
    )
    refs, bad = {}, 1
    for step in range(3):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(step)
        loss = model(torch.randn(5, 8, generator=gen))
        scaler.scale(loss).backward()
        if step == bad:
            model.seeds["b"][0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)  # so the reference sees what the optimizer sees
        refs[step] = _refs(model)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert moved == (step != bad)  # GradScaler really skipped that step
    assert tel.flush(5.0)
    tel.close()
    norms = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    assert [(n.step, n.skipped) for n in norms] == [(0, False), (1, True), (2, False)]
    for n in norms:
        wire = {g.name: g for g in n.groups}
        for name in ("host", "a"):
            assert rel_err(wire[name].sq, refs[n.step][name]) <= 1e-5, (n.step, name)
        if n.step == bad:
            assert wire["b"].nonfinite == 1 and wire["b"].sq == math.inf
        else:
            assert wire["b"].nonfinite == 0 and rel_err(wire["b"].sq, refs[n.step]["b"]) <= 1e-5
    # The scaled gradients are 65536x larger: the capture must be of the unscaled ones.
    assert math.isclose(norms[0].groups[0].sq, refs[0]["host"], rel_tol=1e-5)
    assert "update" not in vars(scaler)  # close() unwrapped it


def test_gradscaler_skipped_steps_respect_every(attach, pull):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = _scaler_or_skip()
    tel = attach(model=model, host="host", optimizer=opt, scaler=scaler, every=2)
    for step in range(4):
        opt.zero_grad()
        loss = model(torch.randn(5, 8))
        scaler.scale(loss).backward()
        if step in (1, 2):
            model.host[0].weight.grad[0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
    assert tel.flush(5.0)
    tel.close()
    norms = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    assert [(n.step, n.skipped) for n in norms] == [(0, False), (2, True)]


@pytest.mark.parametrize("unscale_first", [False, True])
def test_fused_optimizer_skipped_step_is_reported_skipped_and_unscaled(attach, pull, unscale_first):
    """A fused optimizer receives the loss scale from GradScaler and unscales the gradients
    in place inside step() (before it they are 65536x too large: the capture waits for the
    post-hook); it is stepped even when GradScaler found an Inf (the kernel skips), so
    ``update()`` sees a step and the skip is ``found_inf`` on the device. A skipped fused
    step leaves the gradients scaled: the report must still carry the unscaled squares."""
    model = make_model()
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fused AdamW unavailable here: {exc}")
    scaler = _scaler_or_skip()
    tel = attach(
        model=model,
        host="host",
        seeds={"a": "seeds.a", "b": "seeds.b"},
        optimizer=opt,
        scaler=scaler,
    )
    refs, bad = {}, 1
    for step in range(3):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(step)
        scaler.scale(model(torch.randn(5, 8, generator=gen))).backward()
        scale = scaler.get_scale()
        if step == bad:
            model.seeds["b"][0].weight.grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
            scale = 1.0
        refs[step] = {k: v / scale**2 for k, v in _refs(model).items()}
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert moved == (step != bad)  # the fused kernel really skipped that step
        if step != bad:  # and otherwise unscaled in place, inside step()
            assert rel_err(ref_sq(model.host.parameters()), refs[step]["host"]) <= 1e-5
    assert tel.flush(5.0)
    tel.close()
    norms = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    assert [(n.step, n.skipped) for n in norms] == [(0, False), (1, True), (2, False)]
    for n in norms:
        wire = {g.name: g for g in n.groups}
        for name in ("host", "a"):
            assert rel_err(wire[name].sq, refs[n.step][name]) <= 1e-5, (n.step, name, unscale_first)
        assert wire["b"].nonfinite == (1 if n.step == bad else 0)
    assert tel.latest().skipped is False and tel.stats()["errors"] == 0
