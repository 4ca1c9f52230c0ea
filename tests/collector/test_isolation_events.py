"""Isolation: gradient violations for groups declared isolated, and the structural check
(a seed whose input still carries a gradient path), rate-limited, following replaced seeds."""

from __future__ import annotations

import pytest
import torch
from collector_support import make_model, train_step
from torch import nn

import esper_telemetry as et
from esper_telemetry import IsolationViolation, Norms


def _violations(events, kind=None):
    return [
        e for e in events if isinstance(e, IsolationViolation) and (kind is None or e.kind == kind)
    ]


def test_gradient_into_isolated_group_is_reported(attach, pull):
    model = make_model()
    frozen = nn.Linear(3, 3)  # never gets a gradient
    zeroed = nn.Linear(3, 2)  # gets an all-zero gradient
    zeroed.weight.grad = torch.zeros_like(zeroed.weight)
    zeroed.bias.grad = torch.zeros_like(zeroed.bias)
    tiny = nn.Linear(2, 1)  # below the threshold
    tiny.weight.grad = torch.full_like(tiny.weight, 1e-12)
    tel = attach(
        model=model,
        host="host",
        seeds={"a": "seeds.a"},
        groups={"frozen": frozen, "zeroed": zeroed, "tiny": tiny},
        isolated=("a", "frozen", "zeroed", "tiny"),
    )
    train_step(model)  # seed "a" trains: a violation
    tel.capture(step=5)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.groups["a"].isolated and not res.groups["host"].isolated
    tel.close()
    events = pull.until_goodbyes()
    (v,) = _violations(events)
    assert (v.group, v.kind, v.step) == ("a", "gradient", 5)
    assert (
        v.value is not None and abs(v.value - res.groups["a"].norm) <= 1e-9 * res.groups["a"].norm
    )
    (norms,) = [e for e in events if isinstance(e, Norms)]
    assert {g.name for g in norms.groups if g.isolated} == {"a", "frozen", "zeroed", "tiny"}


def test_no_violation_when_isolated_group_stays_clean(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"}, isolated=("a",))
    train_step(model)
    model.seeds["a"].zero_grad(set_to_none=True)
    tel.capture(step=0)
    model.zero_grad(set_to_none=False)  # zeros, not None
    tel.capture(step=1)
    assert tel.flush(5.0)
    tel.close()
    events = pull.until_goodbyes()
    assert len([e for e in events if isinstance(e, Norms)]) == 2
    assert _violations(events) == []


def test_nonfinite_gradient_into_isolated_group_is_a_violation(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"}, isolated=("a",))
    model.seeds["a"].weight.grad = torch.zeros_like(model.seeds["a"].weight)
    model.seeds["a"].weight.grad[0, 0] = float("nan")
    tel.capture(step=2)
    assert tel.flush(5.0)
    tel.close()
    (v,) = _violations(pull.until_goodbyes())
    assert (v.group, v.kind, v.step, v.value) == ("a", "gradient", 2, None)  # NaN cannot travel


def test_structural_check_is_off_unless_asked(attach, pull):
    """Adapters and jointly trained heads see inputs that require grad: no violation by default."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    train_step(model, seed=1, leak=True)
    tel.capture(step=0)
    assert tel.flush(5.0)
    tel.close()
    assert _violations(pull.until_goodbyes(), "structural") == []
    assert len(model.seeds["a"]._forward_pre_hooks) == 0


def test_structural_leak_is_reported_at_every_capture_while_it_lasts(attach, pull):
    model = make_model()
    tel = attach(
        model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"}, structural=("a",)
    )
    train_step(model)  # detached features: nothing to report
    tel.capture(step=0)
    train_step(model, seed=1, leak=True)  # both seeds see features that require grad
    train_step(model, seed=2, leak=True)
    tel.capture(step=1)
    train_step(model, seed=3, leak=True)  # still leaking: reported again, for this step
    tel.capture(step=2)
    with torch.no_grad():
        model(torch.randn(2, 8), leak=True)  # no autograd, no path: not a leak
    train_step(model, seed=4)
    tel.capture(step=3)
    assert tel.flush(5.0)
    tel.close()
    events = pull.until_goodbyes()
    structural = _violations(events, "structural")
    assert [(v.group, v.step) for v in structural] == [("a", 1), ("a", 2)]  # "b" is not watched
    assert all(v.value is None and "requires grad" in v.evidence for v in structural)
    assert "(2 forward passes since the last capture)" in structural[0].evidence
    assert "(1 forward pass since the last capture)" in structural[1].evidence
    assert _violations(events, "gradient") == []


def test_structural_true_watches_every_seed(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"}, structural=True)
    train_step(model, leak=True)
    tel.capture(step=7)
    assert tel.flush(5.0)
    tel.close()
    structural = _violations(pull.until_goodbyes(), "structural")
    assert sorted((v.group, v.step) for v in structural) == [("a", 7), ("b", 7)]


@pytest.mark.parametrize(
    "structural,exc,match",
    [
        ("a", TypeError, "not the string 'a'"),
        (("nope",), ValueError, "unknown group 'nope'"),
        (("p",), ValueError, "'p', which is not a module"),
        (3, TypeError, "structural= takes True or a collection"),
    ],
)
def test_structural_misuse_is_refused_at_attach(structural, exc, match, thread_names):
    model = make_model()
    before = thread_names()
    with pytest.raises(exc, match=match):
        et.attach(
            model=model,
            host="host",
            seeds={"a": "seeds.a"},
            groups={"p": [model.seeds["b"][0].weight]},
            structural=structural,
            endpoint="tcp://127.0.0.1:9",
        )
    assert thread_names() == before


def test_structural_check_follows_a_replaced_seed_and_stops_at_close(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"}, structural=True)
    old = model.seeds["a"]
    model.seeds["a"] = nn.Linear(16, 4)
    train_step(model)
    tel.capture()  # re-resolves: the new module is watched
    old(torch.randn(2, 16, requires_grad=True))  # the detached old module: not watched any more
    tel.capture()
    assert tel.flush(5.0)
    assert _violations(pull.quiet(0.2)) == []
    model.seeds["a"](torch.randn(2, 16, requires_grad=True))
    tel.capture()
    assert tel.flush(5.0)
    tel.close()
    model.seeds["a"](torch.randn(2, 16, requires_grad=True))  # after close: hooks removed
    events = pull.until_goodbyes()
    (v,) = _violations(events, "structural")
    assert v.group == "a"
    assert len(model.seeds["a"]._forward_pre_hooks) == 0 and len(old._forward_pre_hooks) == 0


class _ManyInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, *xs, **kw):
        return self.lin(sum(xs) + sum(kw.values()))


def test_structural_evidence_for_many_inputs_still_fits_the_wire(attach, pull):
    """The daemon rejects a whole message with a string over the wire limit: the evidence
    for a seed with many leaking inputs must be cut to fit, not lose the batch."""
    seed = _ManyInputs()
    tel = attach(host=nn.Linear(2, 2), seeds={"wide": seed}, structural=("wide",))
    xs = [torch.randn(2, requires_grad=True) for _ in range(40)]
    seed(*xs, **{f"extra_input_{i}": torch.randn(2, requires_grad=True) for i in range(10)})
    tel.capture()
    assert tel.flush(5.0)
    tel.close()
    (v,) = _violations(pull.until_goodbyes(), "structural")  # decoded: the daemon would take it
    assert v.group == "wide" and v.evidence.startswith("seed input arg 0, arg 1")
