"""Group norms against a float64 reference, "no gradient" versus zero, non-finite counts,
and what ``latest()`` hands back (the per-seed ratio included)."""

from __future__ import annotations

import math

import pytest
import torch
from collector_support import make_model, numel, ref_sq, rel_err, train_step
from torch import nn

from esper_telemetry import Goodbye, Norms


def _groups(model):
    return {
        "host": list(model.host.parameters()),
        "a": list(model.seeds["a"].parameters()),
        "b": list(model.seeds["b"].parameters()),
    }


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-3)]
)
def test_norms_match_float64_reference(attach, pull, dtype, tol):
    model = make_model(dtype=dtype)
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)
    refs = {name: ref_sq(ps) for name, ps in _groups(model).items()}
    assert all(r is not None and r > 0 for r in refs.values())
    tel.capture(step=7)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res is not None and res.step == 7 and res.skipped is False
    for name, want in refs.items():
        g = res.groups[name]
        assert g.has_grad is True and g.nonfinite == 0
        assert rel_err(g.sq, want) <= tol, (name, g.sq, want)
        assert rel_err(g.norm, math.sqrt(want)) <= tol
        assert g.params == numel(_groups(model)[name])
    tel.close()
    events = pull.until_goodbyes()
    norms = [e for e in events if isinstance(e, Norms)]
    assert [n.step for n in norms] == [7]
    wire = {g.name: g for g in norms[0].groups}
    assert [g.role for g in norms[0].groups] == ["host", "seed", "seed"]
    for name, want in refs.items():
        assert rel_err(wire[name].sq, want) <= tol


def test_half_precision_accumulates_beyond_its_range(attach):
    """fp16 entries of 6e4 are finite, their squares are not: the sum must be taken wider."""
    p = nn.Parameter(torch.zeros(64, dtype=torch.float16))
    p.grad = torch.full((64,), 60000.0, dtype=torch.float16)
    tel = attach(host=[p])
    tel.capture()
    assert tel.flush(5.0)
    g = tel.latest().groups["host"]
    assert g.nonfinite == 0
    assert rel_err(g.sq, 64 * 60000.0**2) <= 1e-3


def test_no_gradient_is_none_not_zero(attach, pull):
    model = make_model()
    frozen = nn.Linear(3, 3)  # never used in the forward pass
    zeroed = nn.Linear(3, 2)
    zeroed.weight.grad = torch.zeros_like(zeroed.weight)
    zeroed.bias.grad = torch.zeros_like(zeroed.bias)
    tel = attach(model=model, host="host", groups={"frozen": frozen, "zeroed": zeroed})
    train_step(model)
    tel.capture()
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.groups["frozen"].sq is None
    assert res.groups["frozen"].norm is None
    assert res.groups["frozen"].has_grad is False
    assert res.groups["frozen"].params == 12
    assert res.groups["zeroed"].sq == 0.0 and res.groups["zeroed"].has_grad is True
    assert rel_err(res.groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-5
    tel.close()
    (norms,) = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    wire = {g.name: g for g in norms.groups}
    assert wire["frozen"].sq is None
    assert wire["zeroed"].sq == 0.0
    assert wire["host"].sq is not None and wire["host"].sq > 0


def test_partly_missing_gradient_counts_what_is_there(attach):
    """A group where only some parameters have a gradient measures those, and has_grad."""
    lin = nn.Linear(4, 4)
    lin.weight.grad = torch.full_like(lin.weight, 0.5)
    tel = attach(host=lin)
    tel.capture()
    assert tel.flush(5.0)
    g = tel.latest().groups["host"]
    assert g.has_grad is True and rel_err(g.sq, 16 * 0.25) <= 1e-6


def test_nonfinite_tensors_are_counted_per_group(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)
    ref_b = ref_sq(model.seeds["b"].parameters())
    a = model.seeds["a"]
    a.weight.grad[0, 0] = float("nan")
    a.bias.grad[1] = float("inf")
    model.host[0].bias.grad[0] = float("-inf")
    tel.capture(step=3)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.groups["a"].nonfinite == 2
    assert res.groups["host"].nonfinite == 1
    assert res.groups["b"].nonfinite == 0
    assert rel_err(res.groups["b"].sq, ref_b) <= 1e-5
    assert math.isnan(res.groups["a"].sq)
    # The next clean capture is clean again.
    model.zero_grad()
    train_step(model, seed=1)
    tel.capture(step=4)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.step == 4 and [g.nonfinite for g in res.groups.values()] == [0, 0, 0]
    assert rel_err(res.groups["a"].sq, ref_sq(a.parameters())) <= 1e-5
    assert tel.stats()["errors"] == 0
    tel.close()
    norms = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    assert [n.step for n in norms] == [3, 4]
    wire = {g.name: g for g in norms[0].groups}
    # A non-finite sum travels as it is, beside its count: an exploding group is not starved.
    assert wire["a"].nonfinite == 2 and math.isnan(wire["a"].sq)
    assert wire["host"].nonfinite == 1 and wire["host"].sq == math.inf  # (-inf)**2
    assert rel_err(wire["b"].sq, ref_b) <= 1e-5
    assert isinstance(pull.events[-1], Goodbye)


def test_latest_and_seed_ratio(attach):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    assert tel.latest() is None
    train_step(model)
    assert tel.latest() is None  # nothing captured yet
    tel.capture()
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.step == 0 and res.rank == 0
    assert res["host"] is res.groups["host"]
    host_sq, host_n = ref_sq(model.host.parameters()), numel(model.host.parameters())
    assert rel_err(res.groups["host"].norm, math.sqrt(host_sq)) <= 1e-5
    assert set(res.ratios) == {"a", "b"}
    for name in ("a", "b"):
        seed = model.seeds[name]
        want = math.sqrt(ref_sq(seed.parameters()) / host_sq) * math.sqrt(
            host_n / numel(seed.parameters())
        )
        assert rel_err(res.ratios[name], want) <= 1e-5
    assert res.ratios["a"] != pytest.approx(res.ratios["b"], rel=1e-3)
    # The default step counter continues from the captures taken.
    tel.capture()
    assert tel.flush(5.0)
    assert tel.latest().step == 1


def test_ratio_is_zero_without_host_gradient(attach):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    model.seeds["a"].weight.grad = torch.ones_like(model.seeds["a"].weight)
    tel.capture()
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.groups["host"].sq is None
    assert res.groups["a"].sq == pytest.approx(64.0)
    assert res.ratios == {"a": 0.0}


def test_latest_is_none_until_a_capture_completes(attach, monkeypatch):
    """latest() never waits: with the completion held back it is still None after capture()."""
    import threading

    model = make_model()
    tel = attach(model=model, host="host")
    gate = threading.Event()
    original = tel._on_done
    monkeypatch.setattr(tel._completion, "_on_done", lambda p: (gate.wait(5.0), original(p)))
    train_step(model)
    tel.capture()
    assert tel.latest() is None
    gate.set()
    assert tel.flush(5.0)
    assert tel.latest() is not None and tel.latest().step == 0


@pytest.mark.parametrize("after", ["clip", "zero_in_place", "free"])
def test_capture_reads_gradients_as_they_were(attach, after):
    """On the CPU the pass runs inside capture(): what training does next cannot change it."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)
    refs = {name: ref_sq(ps) for name, ps in _groups(model).items()}
    tel.capture()
    if after == "clip":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    elif after == "zero_in_place":
        model.zero_grad(set_to_none=False)
    else:
        model.zero_grad(set_to_none=True)
    assert tel.flush(5.0)
    for name, want in refs.items():
        assert rel_err(tel.latest().groups[name].sq, want) <= 1e-5


def test_forced_sharding_and_seed_only_attach(attach, pull):
    model = make_model()
    tel = attach(seeds={"a": model.seeds["a"]}, groups={"h": model.host}, sharded=True)
    train_step(model)
    tel.capture()
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.ratios == {}  # no host, no ratio
    assert all(g.sharded for g in res.groups.values())
    tel.close()
    (norms,) = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    assert [(g.name, g.role, g.sharded) for g in norms.groups] == [
        ("a", "seed", True),
        ("h", "group", True),
    ]


def test_a_seed_that_sits_out_steps_reuses_its_plans(attach):
    """A seed with no gradient on alternate steps (zero_grad(set_to_none=True)) switches
    between two layouts; both plans are kept, not rebuilt at every step."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    for step in range(8):
        model.zero_grad(set_to_none=True)
        train_step(model, seed=step)
        if step % 2:
            for p in model.seeds["b"].parameters():
                p.grad = None  # b sat this step out
        want_b = ref_sq(model.seeds["b"].parameters())
        want_host = ref_sq(model.host.parameters())
        tel.capture(step)
        assert tel.flush(5.0)
        got = tel.latest()
        assert got.step == step and rel_err(got["host"].sq, want_host) <= 1e-5
        assert got["b"].has_grad == (step % 2 == 0)
        assert (got["b"].sq is None) if step % 2 else rel_err(got["b"].sq, want_b) <= 1e-5
    assert tel.stats()["plans"] == 2
