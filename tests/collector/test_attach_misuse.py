"""Misuse raises at attach, at once, and leaves no threads or sockets behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper_telemetry as et
from collector_support import make_model


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(), ValueError, "at least one group"),
    (dict(host="host", isolated=("nope",)), ValueError, "unknown groups"),
    (dict(host="host", seeds={"host": "seeds.a"}), ValueError, "duplicate"),
    (dict(host="host", seeds={"a": "seeds.a"}, groups={"a": "seeds.b"}), ValueError, "duplicate"),
    (dict(host="host.nope"), ValueError, "no submodule"),
    (dict(host="host", seeds={"a": "seeds.zz"}), ValueError, "seeds.zz"),
    (dict(host="host", every=0), ValueError, "every"),
    (dict(host="host", shared_device="cuda:0"), ValueError, "shared_device"),
    (dict(host="host", rank=2, world_size=2), ValueError, "rank"),
    (dict(host="host", rank=-1, world_size=2), ValueError, "rank"),
    (dict(host="host", seeds={"": "seeds.a"}), ValueError, "non-empty"),
    (dict(host=[1, 2]), TypeError, "not a parameter"),
    (dict(host=3), TypeError, "expected a module"),
    (dict(host=[]), ValueError, "no parameters"),
    (dict(host=nn.ReLU()), ValueError, "no parameters"),
])
def test_misuse_raises_at_once(kwargs, exc, match, thread_names):
    model = make_model()
    before = thread_names()
    with pytest.raises(exc, match=match):
        et.attach(model=model, endpoint="tcp://127.0.0.1:9", run="misuse", **kwargs)
    assert thread_names() == before     # nothing was started for a refused attach


def test_dotted_path_needs_a_model():
    with pytest.raises(ValueError, match="needs model="):
        et.attach(host="host", endpoint="tcp://127.0.0.1:9")


def test_valid_edge_values_are_accepted(attach):
    model = make_model()
    tel = attach(model=model, host="host", rank=1, world_size=2, every=1, shared_device=torch.device("cpu"))
    assert (tel.rank, tel.world_size) == (1, 2)


def test_endpoint_and_run_come_from_the_environment(pull, monkeypatch):
    monkeypatch.setenv("ESPER_TELEMETRY_ENDPOINT", pull.endpoint)
    monkeypatch.setenv("ESPER_RUN", "env-run")
    with et.attach(model=make_model(), host="host") as tel:
        assert tel.endpoint == pull.endpoint and tel.run == "env-run"
    hello = pull.until(lambda e: isinstance(e, et.Hello))[0]
    assert hello.run == "env-run" and hello.world_size == 1 and hello.rank == 0


def _linears(n):
    return {f"g{i}": nn.Linear(1, 1) for i in range(n)}


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups={"x" * 257: nn.Linear(1, 1)}), "257"),
    (dict(seeds={"s" * 300: nn.Linear(1, 1)}), "300"),
    (dict(groups=_linears(257)), "257 groups"),
    (dict(groups={"g": nn.Linear(1, 1)}, run="r" * 257), "run"),
])
def test_what_the_wire_cannot_carry_is_refused_at_attach(kwargs, match, thread_names):
    """The daemon rejects a whole message with a name over 256 characters or over 256 groups;
    a collector that attached anyway would lose every event it ever sent."""
    before = thread_names()
    with pytest.raises(ValueError, match=match):
        et.attach(endpoint="tcp://127.0.0.1:9", **kwargs)
    assert thread_names() == before


def test_wire_limits_themselves_are_accepted(pull):
    groups = {f"{i:03d}" + "n" * 253: nn.Linear(1, 1) for i in range(256)}
    for m in groups.values():
        m.weight.grad = torch.ones_like(m.weight)
    with et.attach(groups=groups, endpoint=pull.endpoint, run="r" * 256) as tel:
        tel.capture()
        assert tel.flush(5.0)
        assert len(tel.latest().groups) == 256
    events = pull.until_goodbyes()             # decoding them all proves the daemon takes them
    (norms,) = [e for e in events if isinstance(e, et.Norms)]
    assert len(norms.groups) == 256 and norms.run == "r" * 256
    assert all(g.sq == 1.0 for g in norms.groups)
