"""Groups follow every way a parameter can be replaced, say when they cannot, and are disjoint.

Replacements that fire no registration hook (``.to()`` under
``set_overwrite_module_params_on_conversion(True)``, accelerate's
``set_module_tensor_to_device``) are followed at the next capture; a module object or a
parameter list that is no longer in the model is reported once as ``stale``, never as
"no gradient"; seeds inside the host module are counted in their own group only.
"""

from __future__ import annotations

import logging

import pytest
import torch
from collector_support import make_model, ref_sq, rel_err, train_step
from torch import nn

import esper_telemetry as et


def _capture(tel, step):
    tel.capture(step)
    assert tel.flush(5.0)
    return tel.latest()


def _stale(events):
    return [
        (e.group, e.kind) for e in events if isinstance(e, et.DeviceMismatch) and e.kind == "stale"
    ]


@pytest.fixture
def overwrite_on_conversion():
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    yield
    torch.__future__.set_overwrite_module_params_on_conversion(False)


def test_to_dtype_with_overwritten_parameters_is_followed(attach, pull, overwrite_on_conversion):
    """``_apply`` writes new Parameter objects into ``_parameters`` directly: no hook fires."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": model.seeds["b"]})
    train_step(model)
    _capture(tel, 0)
    model.to(torch.float64)
    model.zero_grad(set_to_none=True)
    train_step(model, seed=1)
    res = _capture(tel, 1)
    for name, module in (("host", model.host), ("a", model.seeds["a"]), ("b", model.seeds["b"])):
        assert res[name].has_grad, name
        assert rel_err(res[name].sq, ref_sq(module.parameters())) <= 1e-12, name
    assert tel.stats()["errors"] == 0


def test_accelerate_set_module_tensor_to_device_is_followed(attach, pull):
    accelerate_utils = pytest.importorskip("accelerate.utils")
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    train_step(model)
    _capture(tel, 0)
    for name, _ in list(model.host[0].named_parameters()):
        accelerate_utils.set_module_tensor_to_device(
            model.host[0], name, "cpu", value=torch.randn_like(getattr(model.host[0], name))
        )
    model.zero_grad(set_to_none=True)
    train_step(model, seed=1)
    res = _capture(tel, 1)
    assert rel_err(res["host"].sq, ref_sq(model.host.parameters())) <= 1e-5  # was 1-8% low
    assert res["host"].params == sum(p.numel() for p in model.host.parameters())


@pytest.mark.parametrize("write", ["replace", "add", "remove", "submodule"])
def test_dict_writes_without_hooks_are_followed(attach, pull, write):
    """Entries of ``_parameters``/``_modules`` written directly: replaced, one more, one fewer."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    train_step(model)
    first = _capture(tel, 0)
    # the last module with parameters: its entries end the follow check's list, where one
    # more or one fewer shifts nothing after it
    lin = [m for m in model.host.modules() if m._parameters][-1]
    if write == "replace":  # an equal-valued 1-element tensor would fool a comparison by value
        lin._parameters["bias"] = nn.Parameter(lin.bias.detach().clone())
        lin.bias.grad = torch.full_like(lin.bias, 3.0)
    elif write == "add":
        lin._parameters["extra"] = nn.Parameter(torch.zeros(2))
        lin.extra.grad = torch.full((2,), 5.0)
    elif write == "remove":
        del lin._parameters["bias"]
    else:  # a submodule swapped under the host's tree
        name = next(n for n, m in model.host.named_modules() if m is lin).rsplit(".", 1)[-1]
        new = nn.Linear(lin.in_features, lin.out_features)
        new.weight.grad = torch.full_like(new.weight, 2.0)
        model.host._modules[name] = new
    res = _capture(tel, 1)
    want = ref_sq(model.host.parameters())
    assert (
        rel_err(res["host"].sq, want) <= 1e-6 and rel_err(res["host"].sq, first["host"].sq) > 1e-3
    )
    assert res["host"].params == sum(p.numel() for p in model.host.parameters())
    assert tel.stats()["errors"] == 0


def test_a_module_object_replaced_in_the_model_is_reported_stale_once(attach, pull, caplog):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": model.seeds["a"], "b": "seeds.b"})
    train_step(model)
    assert not _capture(tel, 0)["a"].stale
    model.seeds["a"] = nn.Linear(16, 4)  # the object given for "a" leaves the model
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        for step in (1, 2, 3):
            model.zero_grad()
            train_step(model, seed=step)
            res = _capture(tel, step)
    assert res["a"].stale and not res["b"].stale and not res["host"].stale
    assert sum("'a' can no longer be followed" in r.getMessage() for r in caplog.records) == 1
    tel.close()
    assert _stale(pull.until_goodbyes()) == [("a", "stale")]


def test_a_seed_slot_culled_to_a_module_without_parameters_has_no_gradient(attach, caplog):
    # Followed by its path, the slot now holds nothing to measure: "no gradient", not stale
    # (stale is for what cannot be followed; FSDP1 flattening a group away is, see
    # test_fsdp1_gloo.py).
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    train_step(model)
    assert _capture(tel, 0)["a"].has_grad
    model.seeds["a"] = nn.Identity()
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        model.zero_grad(set_to_none=True)
        train_step(model, seed=1)
        res = _capture(tel, 1)
    assert not res["a"].stale and not res["a"].has_grad and res["a"].params == 0
    assert res["host"].has_grad and not caplog.records


def test_parameters_listed_before_load_state_dict_assign_are_reported_stale(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": list(model.seeds["a"].parameters())})
    train_step(model)
    _capture(tel, 0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    train_step(model, seed=1)
    res = _capture(tel, 1)
    assert res["a"].stale and not res["host"].stale
    assert rel_err(res["host"].sq, ref_sq(model.host.parameters())) <= 1e-5  # the host follows
    tel.close()
    assert _stale(pull.until_goodbyes()) == [("a", "stale")]


def test_groups_given_outside_the_model_are_not_stale(attach, pull):
    model = make_model()
    extra = nn.Linear(3, 3)
    tel = attach(model=model, host="host", groups={"extra": extra})
    nn.Module().register_module("x", nn.Linear(1, 1))  # some registration anywhere
    extra.weight.grad = torch.ones_like(extra.weight)
    res = _capture(tel, 0)
    assert not res["extra"].stale and res["extra"].sq == 9.0


# -- disjoint groups ----------------------------------------------------------------------------
def test_seeds_inside_the_host_module_are_left_out_of_the_host(attach, pull, caplog):
    model = make_model()
    with caplog.at_level(logging.INFO, logger="esper_telemetry.collector"):
        tel = attach(
            model=model, host=model, seeds={"a": "seeds.a", "b": "seeds.b"}, isolated=("a",)
        )
    assert any(
        "'a', 'b'" in r.getMessage() and "own group" in r.getMessage() for r in caplog.records
    )
    train_step(model)
    res = _capture(tel, 0)
    assert res["host"].params == sum(p.numel() for p in model.host.parameters())
    assert rel_err(res["host"].sq, ref_sq(model.host.parameters())) <= 1e-5


def test_two_named_groups_sharing_a_parameter_are_refused(thread_names):
    model = make_model()
    before = thread_names()
    with pytest.raises(ValueError, match="groups 'a' and 'w' share a parameter"):
        et.attach(
            model=model,
            host="host",
            seeds={"a": "seeds.a"},
            groups={"w": [model.seeds["a"].weight]},
            endpoint="tcp://127.0.0.1:9",
        )
    assert thread_names() == before


def test_no_host_with_a_model_means_every_other_parameter(attach, pull):
    model = make_model()
    tel = attach(model=model, seeds={"a": "seeds.a"})
    train_step(model)
    res = _capture(tel, 0)
    rest = list(model.host.parameters()) + list(model.seeds["b"].parameters())
    assert res["host"].params == sum(p.numel() for p in rest)
    assert rel_err(res["host"].sq, ref_sq(rest)) <= 1e-5
    assert set(res.ratios) == {"a"}


def test_peft_lora_frozen_base_is_isolated_and_exact(attach, pull):
    """The motivating case: host = the PEFT base model, which contains the adapters. Counted
    twice, the frozen (isolated) host "violated" isolation at every step."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16)
    base = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0)
    )
    lora = lambda: [p for n, p in model.named_parameters() if "lora_" in n]  # noqa: E731
    tel = attach(model=model, host=model.base_model.model, seeds={"lora": lora}, isolated=("host",))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    for step in range(2):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        res = _capture(tel, step)
        assert res["host"].sq is None  # frozen: no gradient at all
        assert rel_err(res["lora"].sq, ref_sq(lora())) <= 1e-5
    frozen = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert res["host"].params == frozen
    tel.close()
    events = pull.until_goodbyes()
    assert [e for e in events if isinstance(e, et.IsolationViolation)] == []
