"""Groups resolve to leaves, each once: tied weights, parametrized weights, views, and a
group whose parameters change between attach and the first capture.

Every figure is checked against a float64 reference of the full gradients of the leaves
that really train (each once), read from ``latest()`` and from the wire.
"""

from __future__ import annotations

import logging

import pytest
import torch
from collector_support import make_model, ref_sq, rel_err, train_step
from torch import nn
from torch.nn.utils import parametrizations
from trainer_support import tiny_gpt2

import esper_telemetry as et
from esper_telemetry.collector.norms import sq_error_bound


def _bound(params) -> float:
    """How far, relative, the CPU pass's figure for these parameters may be from the float64
    reference: the largest of their tensors' bounds (``norms.sq_error_bound``), plus a
    float64 rounding per tensor for the group's sum."""
    params = list(params)
    return max(sq_error_bound(p.numel(), p.dtype) for p in params) + len(params) * 2.0**-53


def _capture(tel, step):
    tel.capture(step)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res is not None and res.step == step
    return res


def _device_events(pull, kind):
    return [e.group for e in pull.quiet(0.2) if isinstance(e, et.DeviceMismatch) and e.kind == kind]


# -- tied weights --------------------------------------------------------------------------------
def _gpt2():
    model = tiny_gpt2(0)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2 ships
    return model


def _gpt2_step(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=gen)
    model(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("given", ["list", "callable", "modules"])
def test_a_tied_weight_given_twice_counts_once(attach, pull, given):
    model = _gpt2()
    wte = model.transformer.wte.weight
    emb = {
        # the input and output embeddings, as a user lists them: the same tensor twice
        "list": [model.transformer.wte.weight, model.lm_head.weight],
        "callable": lambda: [*model.transformer.wte.parameters(), *model.lm_head.parameters()],
        "modules": [*model.transformer.wte.parameters(), *model.lm_head.parameters()],
    }[given]
    tel = attach(model=model, groups={"emb": emb})
    _gpt2_step(model)
    res = _capture(tel, 0)
    assert res["emb"].params == wte.numel()  # 3,104, not 6,208
    assert rel_err(res["emb"].sq, ref_sq([wte])) <= _bound([wte])
    # the host (every other parameter of the model) does not hold it a second time
    rest = [p for p in model.parameters() if p is not wte]
    assert res["host"].params == sum(p.numel() for p in rest)
    assert rel_err(res["host"].sq, ref_sq(rest)) <= _bound(rest)
    tel.close()
    events = pull.until_goodbyes()
    (hello,) = [e for e in events if isinstance(e, et.Hello)]
    assert {d.name: d.params for d in hello.groups}["emb"] == wte.numel()
    (norms,) = [e for e in events if isinstance(e, et.Norms)]
    wire = {g.name: g for g in norms.groups}
    assert wire["emb"].params == wte.numel()
    assert rel_err(wire["emb"].sq, ref_sq([wte])) <= _bound([wte])


def test_a_whole_model_with_tied_weights_as_the_host_counts_them_once(attach):
    model = _gpt2()
    tel = attach(host=model, seeds={"head": [model.transformer.ln_f.weight]})
    _gpt2_step(model)
    res = _capture(tel, 0)
    unique = [p for p in model.parameters() if p is not model.transformer.ln_f.weight]
    assert res["host"].params == sum(p.numel() for p in unique)
    assert rel_err(res["host"].sq, ref_sq(unique)) <= _bound(unique)


# -- re-parametrized weights ---------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.head(self.body(x))))


def _net_step(net, seed):
    net.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    net(torch.randn(5, 6, generator=gen)).pow(2).sum().backward()


_PARAMETRIZE = {
    "orthogonal": parametrizations.orthogonal,
    "weight_norm": parametrizations.weight_norm,
}


@pytest.mark.parametrize("how", sorted(_PARAMETRIZE))
@pytest.mark.parametrize("given", ["callable", "path", "module"])
def test_a_weight_parametrized_after_attach_is_measured_at_its_leaves(
    attach, pull, caplog, how, given
):
    net = _Net()
    spec = {"callable": lambda: net.head.weight, "path": "head", "module": net.head}[given]
    tel = attach(model=net, host="body", groups={"head": spec})
    _net_step(net, 0)
    before = _capture(tel, 0)["head"]
    assert before.has_grad
    _PARAMETRIZE[how](net.head)  # module.weight is now recomputed at each access
    leaves = list(net.head.parametrizations.weight.parameters())  # original, or original0/1
    assert leaves and all(p.is_leaf for p in leaves)
    want = leaves if given == "callable" else [*leaves, net.head.bias]
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        for step in (1, 2, 3):
            _net_step(net, step)
            res = _capture(tel, step)
            got = res["head"]
            assert got.has_grad and not got.stale, (step, got)  # was "no gradient" forever
            assert got.params == sum(p.numel() for p in want)
            assert rel_err(got.sq, ref_sq(want)) <= _bound(want)
            # the leaves belong to "head" only (the auto host is "body" here)
            assert rel_err(res["host"].sq, ref_sq(net.body.parameters())) <= 1e-6
    warned = [r.getMessage() for r in caplog.records if "computed tensors" in r.getMessage()]
    if given == "callable":
        assert len(warned) == 1 and "head.parametrizations.weight.original" in warned[0]
    else:
        assert warned == []
    # followed once: one new plan for the new parameters, not one per capture
    assert tel.stats()["plans"] <= 2 and tel.stats()["errors"] == 0


def test_a_callable_given_a_parametrized_weight_at_attach_is_followed_from_the_start(attach):
    net = _Net()
    parametrizations.weight_norm(net.head)
    tel = attach(model=net, host="body", groups={"head": lambda: net.head.weight})
    _net_step(net, 0)
    res = _capture(tel, 0)
    leaves = [
        net.head.parametrizations.weight.original0,
        net.head.parametrizations.weight.original1,
    ]
    assert res["head"].params == sum(p.numel() for p in leaves)
    assert rel_err(res["head"].sq, ref_sq(leaves)) <= _bound(leaves)


def test_a_list_holding_a_parametrized_weight_is_followed_to_its_leaves(attach):
    net = _Net()
    parametrizations.orthogonal(net.head)
    tel = attach(model=net, host="body", groups={"head": [net.head.weight, net.head.bias]})
    for step in (0, 1):
        _net_step(net, step)
        res = _capture(tel, step)
        want = [net.head.parametrizations.weight.original, net.head.bias]
        assert not res["head"].stale and res["head"].params == sum(p.numel() for p in want)
        assert rel_err(res["head"].sq, ref_sq(want)) <= _bound(want)


def test_a_list_whose_weight_weight_norm_replaced_is_reported_stale(attach, pull, caplog):
    """weight_norm replaces the Parameter by two new ones: the object given leaves the model."""
    net = _Net()
    tel = attach(model=net, host="body", groups={"head": [net.head.weight]})
    _net_step(net, 0)
    assert not _capture(tel, 0)["head"].stale
    parametrizations.weight_norm(net.head)
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        for step in (1, 2):
            _net_step(net, step)
            assert _capture(tel, step)["head"].stale
    assert sum("'head' can no longer be followed" in r.getMessage() for r in caplog.records) == 1
    assert _device_events(pull, "stale") == ["head"]


def test_a_view_is_followed_to_the_parameter_it_views(attach, caplog):
    net = _Net()
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        tel = attach(model=net, host="body", groups={"head": lambda: [net.head.weight[:4]]})
    _net_step(net, 0)
    res = _capture(tel, 0)
    assert res["head"].params == net.head.weight.numel()
    assert rel_err(res["head"].sq, ref_sq([net.head.weight])) <= _bound([net.head.weight])
    assert any("head.weight" in r.getMessage() for r in caplog.records)


def test_a_computed_tensor_with_no_graph_makes_the_group_stale_with_its_reason(
    attach, pull, caplog
):
    net = _Net()
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        tel = attach(
            model=net,
            host="body",
            groups={"head": lambda: [net.head.weight.detach() * 2, net.head.bias]},
        )
        for step in (0, 1, 2):
            _net_step(net, step)
            res = _capture(tel, step)
            assert res["head"].stale, step
    reasons = [
        r.getMessage() for r in caplog.records if "can no longer be followed" in r.getMessage()
    ]
    assert len(reasons) == 1 and "no autograd graph" in reasons[0]
    assert _device_events(pull, "stale") == ["head"]
    # what can be followed still is, and is not re-planned at every capture
    assert rel_err(res["head"].sq, ref_sq([net.head.bias])) <= 1e-6
    assert tel.stats()["plans"] == 1


# -- changed between attach and the first capture ------------------------------------------------
def test_a_parameter_made_a_plain_attribute_before_the_first_capture_is_followed_and_reported(
    attach, pull
):
    """As DDP around a tensor-parallel model does on its first forward: a registered weight
    becomes a plain tensor attribute. The path group follows the module (what it registers
    now) and says so with ``moved``, as it would between two captures."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    lin = model.host[2]
    weight = lin.weight
    del lin._parameters["weight"]  # no registration hook fires
    lin.weight = weight.detach().clone().requires_grad_()
    train_step(model)
    res = _capture(tel, 0)
    registered = list(model.host.parameters())
    assert all(p is not lin.weight for p in registered)
    assert res["host"].params == sum(p.numel() for p in registered)
    assert rel_err(res["host"].sq, ref_sq(registered)) <= _bound(registered)
    assert _device_events(pull, "moved") == ["host"]  # not "a": it did not change
    train_step(model, seed=1)
    _capture(tel, 1)
    assert _device_events(pull, "moved") == ["host"]  # once


@pytest.mark.parametrize("given", ["module", "list"])
def test_a_group_that_leaves_the_model_before_the_first_capture_is_stale(attach, pull, given):
    model = make_model()
    spec = model.seeds["a"] if given == "module" else list(model.seeds["a"].parameters())
    tel = attach(model=model, host="host", seeds={"a": spec, "b": "seeds.b"})
    if given == "module":
        model.seeds["a"] = nn.Linear(16, 4)
    else:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    train_step(model)
    res = _capture(tel, 0)
    assert res["a"].stale and not res["b"].stale and not res["host"].stale
    assert rel_err(res["b"].sq, ref_sq(model.seeds["b"].parameters())) <= 1e-6
    assert _device_events(pull, "stale") == ["a"]
