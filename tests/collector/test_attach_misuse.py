"""Misuse raises at attach, at once, and leaves no threads or sockets behind."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
from collector_support import make_model
from torch import nn

import esper_telemetry as et


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(host="host", isolated=("nope",)), ValueError, "unknown groups"),
        (dict(host="host", seeds={"host": "seeds.a"}), ValueError, "duplicate"),
        (
            dict(host="host", seeds={"a": "seeds.a"}, groups={"a": "seeds.b"}),
            ValueError,
            "duplicate",
        ),
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
    ],
)
def test_misuse_raises_at_once(kwargs, exc, match, thread_names):
    model = make_model()
    before = thread_names()
    with pytest.raises(exc, match=match):
        et.attach(model=model, endpoint="tcp://127.0.0.1:9", run="misuse", **kwargs)
    assert thread_names() == before  # nothing was started for a refused attach


def test_no_group_at_all_is_refused():
    with pytest.raises(ValueError, match="at least one group"):
        et.attach(endpoint="tcp://127.0.0.1:9")
    with pytest.raises(ValueError, match="the model has none"):
        et.attach(model=nn.ReLU(), endpoint="tcp://127.0.0.1:9")


def test_dotted_path_needs_a_model():
    with pytest.raises(ValueError, match="needs model="):
        et.attach(host="host", endpoint="tcp://127.0.0.1:9")


def test_valid_edge_values_are_accepted(attach):
    model = make_model()
    tel = attach(
        model=model, host="host", rank=1, world_size=2, every=1, shared_device=torch.device("cpu")
    )
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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(groups={"x" * 257: nn.Linear(1, 1)}), "257"),
        (dict(seeds={"s" * 300: nn.Linear(1, 1)}), "300"),
        (dict(groups=_linears(257)), "257 groups"),
        (dict(groups={"g": nn.Linear(1, 1)}, run="r" * 257), "run"),
    ],
)
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
    events = pull.until_goodbyes()  # decoding them all proves the daemon takes them
    (norms,) = [e for e in events if isinstance(e, et.Norms)]
    assert len(norms.groups) == 256 and norms.run == "r" * 256
    assert all(g.sq == 1.0 for g in norms.groups)


# -- what attach refuses, and that a refusal leaves nothing behind ------------------------------
def _open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def nothing_left(thread_names):
    """Checks, after the test body, that no thread, file descriptor (a ZeroMQ socket or context
    opens several) or optimizer hook was left by a refused attach."""
    threads, fds = thread_names(), _open_fds()
    yield
    gc.collect()
    assert thread_names() == threads
    assert _open_fds() <= fds, "a refused attach left file descriptors open"


_OPT = object()  # stands for "a real optimizer", made per case below


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(endpoint="localhost:5569"),
            ValueError,
            r"endpoint= 'localhost:5569' is not tcp://HOST:PORT",
        ),
        (dict(endpoint="tcp://127.0.0.1:70000"), ValueError, "endpoint= port out of range"),
        (dict(endpoint="tcp://127.0.0.1:0"), ValueError, "port out of range"),
        (dict(endpoint="tcp://*:5569"), ValueError, "'\\*' is for listening"),
        (dict(endpoint="udp://127.0.0.1:5569"), ValueError, "inproc://NAME"),
        (dict(endpoint="ipc://"), ValueError, "has no path"),
        (dict(endpoint=5569), TypeError, "endpoint= an endpoint is a string"),
        (
            dict(isolated="host"),
            TypeError,
            r"isolated= takes a collection of group names, not the string 'host'",
        ),
        (dict(isolated=5), TypeError, "isolated= takes a collection"),
        (dict(isolated=(nn.Linear(1, 1),)), TypeError, "isolated= takes group names"),
        (dict(seeds=["seeds.a"]), TypeError, "seeds= takes a mapping"),
        (dict(groups=[nn.Linear(1, 1)]), TypeError, "groups= takes a mapping"),
        (
            dict(seeds={"a": 3.5}),
            TypeError,
            "group 'a': expected a module, parameters, a callable or a dotted path",
        ),
        (dict(seeds={"a": {"w": 1}}), TypeError, "group 'a': str is not a parameter"),
        (
            dict(optimizer=object()),
            TypeError,
            "optimizer= takes a torch.optim.Optimizer, got object",
        ),
        (dict(optimizer=_OPT, scaler=object()), TypeError, "scaler= takes a torch.amp.GradScaler"),
        (dict(scaler=torch.amp.GradScaler("cpu")), ValueError, "scaler= needs optimizer="),
        (dict(every=2.0), TypeError, "every= takes an int"),
        (dict(queue_size=0), ValueError, "queue_size must be >= 1"),
        (dict(heartbeat_s=0), ValueError, "heartbeat_s must be a finite number > 0"),
        (dict(close_timeout_s=float("nan")), ValueError, "close_timeout_s"),
        (dict(isolation_threshold=-1.0), ValueError, "isolation_threshold"),
        (dict(sharded="yes"), TypeError, "sharded= takes True, False or None"),
        (dict(run=7), TypeError, "run= takes a string"),
        (dict(shared_device="gpu"), ValueError, "shared_device='gpu' is not a device"),
    ],
)
def test_attach_refuses_misuse_naming_the_argument(kwargs, exc, match, nothing_left):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = dict(model=model, host="host", endpoint="tcp://127.0.0.1:9", run="misuse")
    args.update({k: (opt if v is _OPT else v) for k, v in kwargs.items()})
    with pytest.raises(exc, match=match):
        et.attach(**args)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_a_bad_endpoint_from_the_environment_names_the_variable(monkeypatch, nothing_left):
    monkeypatch.setenv("ESPER_TELEMETRY_ENDPOINT", "127.0.0.1:5569")
    with pytest.raises(
        ValueError, match="^ESPER_TELEMETRY_ENDPOINT '127.0.0.1:5569' is not tcp://"
    ):
        et.attach(model=make_model(), host="host")


def test_inproc_and_ipc_endpoints_are_accepted(tmp_path):
    for endpoint in ("inproc://esper-test", f"ipc://{tmp_path}/esper.sock"):
        with et.attach(
            model=make_model(), host="host", endpoint=endpoint, close_timeout_s=0.2
        ) as tel:
            assert tel.endpoint == endpoint
    # Nobody binds these endpoints: close() gives up after 0.2 s while the sender still
    # waits to drop its last events; the thread then ends on its own, closing its socket.
    for thread in threading.enumerate():
        if thread.name == "esper-telemetry-sender":
            thread.join(5.0)
            assert not thread.is_alive(), "a sender thread outlived its close by 5 s"


def test_a_failure_while_starting_unhooks_the_optimizer(monkeypatch, nothing_left):
    """Threads and the socket start last; if starting them fails, the hooks already
    registered on the optimizer and the scaler are removed again."""
    from esper_telemetry.collector import telemetry

    def refuse(*args, **kwargs):
        raise OSError("no more sockets")

    monkeypatch.setattr(telemetry, "Publisher", refuse)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(OSError, match="no more sockets"):
        et.attach(
            model=model, host="host", optimizer=opt, scaler=scaler, endpoint="tcp://127.0.0.1:9"
        )
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert "update" not in vars(scaler)


@pytest.mark.filterwarnings("ignore:Using backward")
def test_the_norm_pass_records_no_autograd_history(attach):
    """After backward(create_graph=True) the gradients require grad; a pass outside no_grad
    would save them for a backward that never comes (found by the pack hook firing)."""
    model = make_model()
    tel = attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"})
    x = torch.randn(4, 8)
    loss = model(x)
    loss.backward(create_graph=True)
    assert model.host[0].weight.grad.requires_grad
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        tel.capture()
    assert tel.flush(5.0)
    assert packed == []
    result = tel.latest()
    ref = sum(float(p.grad.detach().double().pow(2).sum()) for p in model.host.parameters())
    assert result["host"].sq == pytest.approx(ref, rel=1e-6)
    assert tel.stats()["errors"] == 0
