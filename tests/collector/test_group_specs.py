"""Group specs of every kind, and live re-resolution: replaced seeds, reassigned parameters
and dtype changes are measured by the next capture, each re-binding reported once."""

from __future__ import annotations

import pytest
import torch
from collector_support import make_model, numel, ref_sq, rel_err, train_step
from torch import nn

from esper_telemetry import DeviceMismatch, Hello, Norms


def _capture_and_check(tel, model, step, tol=1e-5):
    tel.capture(step=step)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.step == step
    want = {"host": model.host, "a": model.seeds["a"], "b": model.seeds["b"]}
    for name, module in want.items():
        if name in res.groups:
            assert rel_err(res.groups[name].sq, ref_sq(module.parameters())) <= tol, name
            assert res.groups[name].params == numel(module.parameters())
    return res


def _moved(events):
    return [
        (e.group, e.devices) for e in events if isinstance(e, DeviceMismatch) and e.kind == "moved"
    ]


def test_every_spec_kind_measures_the_same_parameters(attach, pull):
    model = make_model()
    tel = attach(
        model=model,
        host=model.host.parameters(),  # a one-shot generator of parameters
        seeds={
            "a": lambda: model.seeds["a"],  # a callable returning a module
            "b": "seeds.b",
        },  # a dotted path
    )
    # Groups are disjoint, so the other two kinds watch the same seeds from a second collector.
    other = attach(
        model=model,
        run="other",
        groups={
            "bparams": lambda: list(model.seeds["b"].parameters()),  # callable -> params
            "single": model.seeds["a"].weight,
        },
    )  # one tensor
    for step in range(3):  # the generator must not be exhausted
        model.zero_grad()
        train_step(model, seed=step)
        res = _capture_and_check(tel, model, step)
        other.capture(step)
        assert other.flush(5.0)
        res = other.latest()
        assert rel_err(res.groups["bparams"].sq, ref_sq(model.seeds["b"].parameters())) <= 1e-5
        assert rel_err(res.groups["single"].sq, ref_sq([model.seeds["a"].weight])) <= 1e-5
    tel.close()
    other.close()
    events = pull.until_goodbyes(2)
    hellos = {e.run: e for e in events if isinstance(e, Hello)}
    assert [(g.name, g.role, g.params) for g in hellos["test"].groups] == [
        ("host", "host", 416),
        ("a", "seed", 68),
        ("b", "seed", 123),
    ]
    # model= without host=: the host is every parameter in no other group (here: all but 123 + 64)
    assert [(g.name, g.role, g.params) for g in hellos["other"].groups] == [
        ("host", "host", 416 + 68 + 123 - 123 - 64),
        ("bparams", "group", 123),
        ("single", "group", 64),
    ]
    assert _moved(events) == []


@pytest.mark.parametrize("kind", ["path", "callable"])
def test_replaced_seed_is_followed(attach, pull, kind):
    model = make_model()
    spec = "seeds.a" if kind == "path" else (lambda: model.seeds["a"])
    tel = attach(model=model, host="host", seeds={"a": spec, "b": "seeds.b"})
    train_step(model)
    _capture_and_check(tel, model, 0)
    old = model.seeds["a"]
    model.zero_grad()
    model.seeds["a"] = nn.Sequential(nn.Linear(16, 5), nn.Linear(5, 4))  # other shape and count
    train_step(model, seed=1)
    assert old.weight.grad is None  # the old module is out of the graph
    res = _capture_and_check(tel, model, 1)
    assert res.groups["a"].params == 16 * 5 + 5 + 5 * 4 + 4
    assert res.groups["a"].has_grad
    model.zero_grad()
    train_step(model, seed=2)
    _capture_and_check(tel, model, 2)
    tel.close()
    events = pull.until_goodbyes()
    assert _moved(events) == [("a", ("cpu",))]  # exactly once, for that group only
    norms = [e for e in events if isinstance(e, Norms)]
    assert [{g.name: g.params for g in n.groups}["a"] for n in norms] == [68, 109, 109]


def test_replaced_seed_with_same_shape_is_followed(attach, pull):
    """Same count and dtypes, new tensors: the plan may be reused but must read the new ones."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    train_step(model)
    _capture_and_check(tel, model, 0)
    model.zero_grad()
    torch.manual_seed(123)
    model.seeds["a"] = nn.Linear(16, 4)
    train_step(model, seed=1)
    _capture_and_check(tel, model, 1)
    tel.close()
    assert _moved(pull.until_goodbyes()) == [("a", ("cpu",))]


def test_load_state_dict_assign_is_followed(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model)
    _capture_and_check(tel, model, 0)
    old_params = list(model.seeds["a"].parameters())
    torch.manual_seed(7)
    new_state = {k: torch.randn_like(v) * 3 for k, v in model.state_dict().items()}
    model.load_state_dict(new_state, assign=True)
    assert all(a is not b for a, b in zip(old_params, model.seeds["a"].parameters()))
    model.zero_grad()
    train_step(model, seed=1)
    res = _capture_and_check(tel, model, 1)
    assert res.groups["a"].sq != pytest.approx(ref_sq(old_params) or 0.0)
    model.zero_grad()
    train_step(model, seed=2)
    _capture_and_check(tel, model, 2)
    tel.close()
    assert sorted(_moved(pull.until_goodbyes())) == [
        ("a", ("cpu",)),
        ("b", ("cpu",)),
        ("host", ("cpu",)),
    ]


def test_dtype_change_is_followed(attach):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    train_step(model)
    _capture_and_check(tel, model, 0)
    model.to(torch.float64)
    model.zero_grad()
    train_step(model, seed=1)
    _capture_and_check(tel, model, 1, tol=1e-12)
    model.to(torch.bfloat16)
    model.zero_grad()
    train_step(model, seed=2)
    _capture_and_check(tel, model, 2, tol=1e-3)


def test_gradients_freed_and_recreated_are_followed(attach):
    """zero_grad() frees gradients; the next backward makes new ones at new addresses."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    for step in range(4):
        model.zero_grad(set_to_none=(step % 2 == 0))
        train_step(model, seed=step)
        _capture_and_check(tel, model, step)
    model.zero_grad(set_to_none=True)
    tel.capture(step=4)
    assert tel.flush(5.0)
    assert all(g.sq is None and not g.has_grad for g in tel.latest().groups.values())


def test_returning_to_an_earlier_dtype_reuses_its_plan_and_stays_correct(attach, pull):
    """Plans are kept per layout: float32 -> float64 -> float32 builds two, and the reused
    one measures the new tensors (same parameters, new storage) correctly."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    for step, dtype in enumerate([torch.float32, torch.float64, torch.float32]):
        model.zero_grad(set_to_none=True)
        model.to(dtype)
        train_step(model, seed=step)
        tel.capture(step)
        assert tel.flush(5.0)
        assert rel_err(tel.latest()["host"].sq, ref_sq(model.host.parameters())) <= 1e-5
    assert tel.stats()["plans"] == 2
    tel.close()
    pull.until_goodbyes()
    assert [e.step for e in pull.of(Norms)] == [0, 1, 2]
