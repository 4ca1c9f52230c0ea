"""``peft_groups``: the groups of a PEFT model, checked against the model's own parameter names.

Each test builds its model from a config (nothing downloaded), attaches with the preset to
a real PULL socket on a random loopback port, and reads what the collector measured.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
zmq = pytest.importorskip("zmq")
from torch import nn  # noqa: E402
from trainer_support import sq64, tiny_lora_gpt2, token_batches  # noqa: E402

import esper_telemetry as et  # noqa: E402
from esper_telemetry import IsolationViolation, decode  # noqa: E402
from esper_telemetry.integrations.peft import peft_groups  # noqa: E402


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Pull(NamedTuple):
    sock: object
    endpoint: str


@pytest.fixture
def pull() -> Iterator[Pull]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield Pull(sock, f"tcp://127.0.0.1:{port}")
    finally:
        sock.close(linger=0)
        ctx.term()


def received(sock, timeout_s: float = 5.0) -> list[object]:
    """Every event the socket holds, waiting up to ``timeout_s`` for the first."""
    events = []
    while sock.poll(int(timeout_s * 1000) if not events else 200, zmq.POLLIN):
        events.extend(decode(sock.recv()))
    return events


def ids(params) -> set:
    return {id(p) for p in params}


def by_name(model, pattern: str) -> dict[str, list]:
    """Parameters grouped by the first match group of ``pattern`` in their names ("host": none)."""
    out: dict[str, list] = {}
    for name, p in model.named_parameters():
        m = re.search(pattern, name)
        out.setdefault(m.group(1) if m else "host", []).append(p)
    return out


def gpt2_step(model, seed: int = 0) -> None:
    batch = token_batches(2, seed)
    ids_ = torch.stack([b["input_ids"] for b in batch])
    model.zero_grad(set_to_none=True)
    model(input_ids=ids_, labels=ids_).loss.backward()


def test_one_seed_per_adapter_and_the_frozen_base_as_isolated_host(pull):
    model = tiny_lora_gpt2()
    model.add_adapter(
        "second",
        peft.LoraConfig(
            r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
        ),
    )
    model.base_model.set_adapter(["default", "second"])  # both train
    kw = peft_groups(model)
    assert set(kw) == {"model", "seeds", "isolated"} and kw["model"] is model
    assert kw["isolated"] == ("host",)
    expected = by_name(model, r"\.lora_[AB]\.(\w+)\.weight$")
    assert sorted(kw["seeds"]) == ["default", "second"]
    for name, fn in kw["seeds"].items():
        assert ids(fn()) == ids(expected[name]) and len(expected[name]) == 4, name

    with et.attach(**kw, run="peft", endpoint=pull.endpoint) as tel:
        gpt2_step(model)
        tel.capture(0)
        assert tel.flush(5.0)
        latest = tel.latest()
    for name in ("default", "second"):
        assert latest.groups[name].sq == pytest.approx(sq64(expected[name]), rel=1e-5)
        assert latest.groups[name].role == "seed"
    host = latest.groups["host"]
    assert host.isolated and not host.has_grad and host.sq is None
    assert host.params == sum(p.numel() for p in expected["host"])


def test_per_module_seeds_are_named_by_adapter_and_path():
    model = tiny_lora_gpt2(target_modules=("c_attn", "c_fc"))
    kw = peft_groups(model, per_module=True)
    expected = by_name(model, r"^base_model\.model\.(.+)\.lora_[AB]\.default\.weight$")
    assert sorted(kw["seeds"]) == sorted(f"default:{path}" for path in expected if path != "host")
    assert "default:transformer.h.1.mlp.c_fc" in kw["seeds"] and len(kw["seeds"]) == 4
    for name, fn in kw["seeds"].items():
        assert ids(fn()) == ids(expected[name.split(":", 1)[1]]), name


def test_a_replaced_adapter_layer_is_followed(pull):
    model = tiny_lora_gpt2()
    kw = peft_groups(model)
    with et.attach(**kw, run="peft-replace", endpoint=pull.endpoint) as tel:
        gpt2_step(model)
        tel.capture(0)
        layer = model.base_model.model.transformer.h[0].attn.c_attn
        old = layer.lora_B["default"].weight
        layer.lora_B["default"] = nn.Linear(4, 96, bias=False)  # a reloaded adapter weight
        now = kw["seeds"]["default"]()
        assert all(p is not old for p in now) and any(
            p is layer.lora_B["default"].weight for p in now
        )
        gpt2_step(model, seed=1)
        tel.capture(1)
        assert tel.flush(5.0)
        latest = tel.latest()
    expected = by_name(model, r"\.lora_[AB]\.(\w+)\.weight$")["default"]
    assert any(p is layer.lora_B["default"].weight for p in expected)
    assert latest.step == 1
    assert latest.groups["default"].sq == pytest.approx(sq64(expected), rel=1e-5)


def test_modules_to_save_belong_to_the_adapter_and_their_originals_to_the_host():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        MLP(), peft.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"])
    )
    kw = peft_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    seed = sorted(names[id(p)] for p in kw["seeds"]["default"]())
    assert seed == [
        "base_model.model.fc1.lora_A.default.weight",
        "base_model.model.fc1.lora_B.default.weight",
        "base_model.model.head.modules_to_save.default.bias",
        "base_model.model.head.modules_to_save.default.weight",
    ]
    assert kw["isolated"] == ("host",)  # the original head is frozen with the rest of the base


def test_a_trainable_base_is_not_declared_isolated_and_a_base_that_starts_training_is_reported(
    pull,
):
    model = tiny_lora_gpt2()
    wte = model.base_model.model.transformer.wte.weight
    wte.requires_grad_(True)
    assert "isolated" not in peft_groups(model)

    wte.requires_grad_(False)
    kw = peft_groups(model)
    assert kw["isolated"] == ("host",)
    with et.attach(**kw, run="peft-leak", endpoint=pull.endpoint) as tel:
        wte.requires_grad_(True)  # "frozen" weights that silently train
        gpt2_step(model)
        tel.capture(7)
        assert tel.flush(5.0)
    violations = [e for e in received(pull.sock) if isinstance(e, IsolationViolation)]
    assert [(v.group, v.kind, v.step) for v in violations] == [("host", "gradient", 7)]
    assert violations[0].value == pytest.approx(sq64([wte]) ** 0.5, rel=1e-5)


def test_misuse_raises_with_a_clear_message():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        peft_groups("model")
    with pytest.raises(ValueError, match="no PEFT adapter"):
        peft_groups(MLP())
    with pytest.raises(TypeError, match="per_module"):
        peft_groups(tiny_lora_gpt2(), per_module="yes")


def test_the_package_face_exports_the_preset_lazily():
    import esper_telemetry.integrations.peft as module

    assert et.peft_groups is module.peft_groups
    assert "peft_groups" in et.__all__ and "peft_groups" in dir(et)
