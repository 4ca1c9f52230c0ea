"""Internal errors are counted and logged once, never raised into training; later captures work."""

from __future__ import annotations

import logging

import torch
from collector_support import make_model, ref_sq, rel_err, train_step
from torch import nn

from esper_telemetry import Norms


def test_failing_norm_pass_is_counted_not_raised(attach, pull, monkeypatch, caplog):
    import esper_telemetry.collector.cpu_threads as passes  # where the CPU pass computes norms

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = attach(model=model, host="host", seeds={"a": "seeds.a"})
    real = passes.tensor_squares

    def broken(*args, **kwargs):
        raise RuntimeError("norm kernel exploded")

    monkeypatch.setattr(passes, "tensor_squares", broken)
    with caplog.at_level(logging.WARNING, logger="esper_telemetry.collector"):
        for step in range(3):
            opt.zero_grad()
            train_step(model, seed=step)
            tel.capture(step=step)  # must not raise
            opt.step()  # training goes on
    assert tel.stats()["errors"] == 3
    logged = [r for r in caplog.records if "norm kernel exploded" in r.getMessage()]
    assert len(logged) == 1  # logged once, then only counted
    monkeypatch.setattr(passes, "tensor_squares", real)
    opt.zero_grad()
    train_step(model, seed=3)
    tel.capture(step=3)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.step == 3 and rel_err(res.groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-5
    assert tel.stats()["errors"] == 3 and tel.stats()["completed"] == 1
    tel.close()
    assert [e.step for e in pull.until_goodbyes() if isinstance(e, Norms)] == [3]


def test_sparse_gradient_is_an_error_not_a_crash(attach):
    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 4)
    tel = attach(host=lin, groups={"emb": emb})
    out = lin(emb(torch.tensor([1, 2, 3])))
    out.pow(2).sum().backward()
    assert emb.weight.grad.is_sparse
    tel.capture(step=0)
    assert tel.flush(5.0)
    assert tel.stats()["errors"] == 1 and tel.latest() is None
    emb.weight.grad = None  # the user drops the sparse gradient
    tel.capture(step=1)
    assert tel.flush(5.0)
    res = tel.latest()
    assert res.step == 1 and res.groups["emb"].sq is None
    assert rel_err(res.groups["host"].sq, ref_sq(lin.parameters())) <= 1e-5
    assert tel.stats()["errors"] == 1


def test_error_in_completion_is_counted_and_the_thread_survives(attach, monkeypatch):
    model = make_model()
    tel = attach(model=model, host="host")
    calls = []
    real = tel._completion._on_done

    def flaky(pending):
        calls.append(pending.step)
        if len(calls) == 1:
            raise ValueError("bad result")
        return real(pending)

    monkeypatch.setattr(tel._completion, "_on_done", flaky)
    train_step(model)
    tel.capture(step=0)
    tel.capture(step=1)
    assert tel.flush(5.0)
    assert calls == [0, 1]
    assert tel.stats()["errors"] == 1 and tel.stats()["completed"] == 2
    assert tel.latest().step == 1


def test_dead_root_model_is_an_error_not_a_crash(attach):
    model = make_model()
    tel = attach(model=model, host="host")
    train_step(model)
    tel.capture(step=0)
    assert tel.flush(5.0)
    del model  # the collector holds no strong reference
    import gc

    gc.collect()
    tel.capture(step=1)
    assert tel.flush(5.0)
    assert tel.stats()["errors"] == 1 and tel.latest().step == 0


def test_internal_errors_travel_in_heartbeats(attach, pull):
    """A collector whose every capture fails still heartbeats; the daemon must see why no
    norms arrive, so the error count travels with the heartbeat."""
    from esper_telemetry import Heartbeat

    emb = nn.Embedding(10, 4, sparse=True)
    tel = attach(groups={"emb": emb}, heartbeat_s=3600.0)
    emb(torch.tensor([1, 2])).pow(2).sum().backward()
    tel.capture()
    tel.capture()
    assert tel.flush(5.0)
    assert tel.stats()["errors"] == 2
    tel.close()
    events = pull.until_goodbyes()
    assert [e for e in events if isinstance(e, Norms)] == []
    assert [e for e in events if isinstance(e, Heartbeat)][-1].errors == 2


def test_odd_steps_never_poison_a_batch(attach, pull):
    """A tensor step is taken as its integer; a negative one (the wire carries counts) is
    an error for that capture alone, never a message the daemon rejects with its neighbours."""
    model = make_model()
    tel = attach(model=model, host="host")
    train_step(model)
    tel.capture(step=torch.tensor(3))
    tel.capture(step=-1)
    tel.capture(step=4)
    assert tel.flush(5.0)
    assert tel.stats()["errors"] == 1
    tel.close()
    norms = [e for e in pull.until_goodbyes() if isinstance(e, Norms)]
    assert [(n.step, type(n.step)) for n in norms] == [(3, int), (4, int)]
