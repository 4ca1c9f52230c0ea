"""torch.compile: capture() inside a compiled step, the structural hook inside a compiled
model and the optimizer hooks under a compiled optimizer step never raise into training,
add no graph break of their own beyond the one capture call, and cause no recompiles."""

from __future__ import annotations

import pytest
import torch
from collector_support import make_model, ref_sq, rel_err

import esper_telemetry as et

pytestmark = pytest.mark.slow

torch_dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _breaks():
    return dict(torch._dynamo.utils.counters["graph_break"])


def _ours(breaks):
    """Graph breaks caused by the collector, other than the disabled capture itself."""
    return [
        r
        for r in breaks
        if ("esper" in r or "isolation" in r or "hook" in r.lower())
        and "torch.compiler.disable" not in r
        and "function `disable`" not in r
    ]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_capture_inside_a_compiled_step_is_exact_and_never_raises(attach, pull, backend):
    model = make_model()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = attach(
        model=compiled, host="host", seeds={"a": "seeds.a", "b": "seeds.b"}, structural=True
    )

    @torch.compile(backend=backend)
    def step(x):
        loss = compiled(x)
        loss.backward()
        tel.capture()
        return loss

    refs, graphs_after_warmup = [], None
    for i in range(4):
        opt.zero_grad()
        step(torch.randn(5, 8, generator=torch.Generator().manual_seed(i)))
        refs.append(
            {"host": ref_sq(model.host.parameters()), "a": ref_sq(model.seeds["a"].parameters())}
        )
        opt.step()
        if i == 1:
            graphs_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert tel.flush(5.0)
    stats = tel.stats()
    assert stats["captures"] == 4 and stats["errors"] == 0
    assert tel.latest().step == 3
    assert rel_err(tel.latest()["host"].sq, refs[3]["host"]) <= 1e-5
    assert rel_err(tel.latest()["a"].sq, refs[3]["a"]) <= 1e-5
    assert (
        torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_warmup
    )  # no recompiles
    assert _ours(_breaks()) == []


def test_structural_hook_in_a_compiled_model_adds_no_graph_break_and_reports(attach, pull):
    model = make_model()
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    tel = attach(model=compiled, host="host", seeds={"a": "seeds.a"}, structural=("a",))
    for i in range(3):
        loss = compiled(torch.randn(5, 8), leak=True)  # the seed's input requires grad
        loss.backward()
        tel.capture(step=i)
    assert tel.flush(5.0)
    tel.close()
    assert _breaks() == {}  # the whole forward, hook included, is one graph
    events = pull.until_goodbyes()
    steps = [
        e.step for e in events if isinstance(e, et.IsolationViolation) and e.kind == "structural"
    ]
    assert steps == [0, 1, 2]


def test_optimizer_hooks_under_a_compiled_optimizer_step(attach, pull):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"}, optimizer=opt)

    @torch.compile(backend="eager")
    def opt_step():
        opt.step()

    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).backward()
        ref = ref_sq(model.host.parameters())
        opt_step()
    assert tel.flush(5.0)
    assert tel.stats()["captures"] == 3 and tel.stats()["errors"] == 0
    assert rel_err(tel.latest()["host"].sq, ref) <= 1e-5
