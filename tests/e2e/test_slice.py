"""The thin slice end to end: a real training loop, the collector, the daemon process, HTTP.

A host with two seeds trained on its detached features runs on the CPU with the collector
attached; ``esper-telemetryd`` runs as a child process through its console script on free
loopback ports; ``/metrics`` is read over HTTP and each group's ``esper_grad_norm`` is
checked against a float64 reference computed from the gradients of the last captured step.
Every wait is bounded and the daemon is always stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("prometheus_client")
from torch import nn  # noqa: E402

import esper_telemetry  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0
SETTLE_TIMEOUT_S = 10.0
DEMO_TIMEOUT_S = 60.0
REL = 1e-5


# -- processes and HTTP -----------------------------------------------------------------------
# The daemon starts the one way the demo and the tests start it.
from daemon_support import get  # noqa: E402
from daemon_support import parse as samples  # noqa: E402
from live_daemon import LiveDaemon as Daemon  # noqa: E402
from live_daemon import live_daemon  # noqa: E402

from esper_telemetry.commands.daemon_process import console_script, http_get  # noqa: E402


def clean_env() -> dict[str, str]:
    """This environment without ESPER_* settings, so only the test's flags configure the daemon."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns something other than None; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (value := predicate()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return value


def metrics(d: Daemon) -> str:
    status, body = http_get(d.url)
    assert status == 200, f"/metrics answered {status}; daemon log:\n{d.log()}"
    return body


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with live_daemon(tmp_path / "esper-telemetryd.log", "--log.level=debug") as d:
        d.wait_ready()
        yield d


# -- the training job -----------------------------------------------------------------------
class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> tuple:
        features = self.trunk(x)
        return self.head(features), features


class Net(nn.Module):
    """A host and two seeds of different shapes that read its detached features."""

    def __init__(self) -> None:
        super().__init__()
        self.host = Host()
        self.probe = nn.Linear(32, 3)
        self.adapter = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> tuple:
        logits, features = self.host(x)
        detached = features.detach()
        return logits, self.probe(detached), self.adapter(detached)


GROUPS = ("host", "probe", "adapter")


def group_params(net: Net) -> dict[str, list[torch.Tensor]]:
    return {
        "host": list(net.host.parameters()),
        "probe": list(net.probe.parameters()),
        "adapter": list(net.adapter.parameters()),
    }


def reference_sq(params: list[torch.Tensor]) -> float:
    """Sum of squared gradient entries in float64, on the CPU."""
    return float(sum(p.grad.detach().to("cpu", torch.float64).pow(2).sum() for p in params))


def test_exported_grad_norms_match_a_float64_reference(daemon: Daemon) -> None:
    torch.manual_seed(1234)
    net = Net()
    params = group_params(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(256, 16)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(dim=1)
    run = f"e2e-{os.getpid()}"
    steps = 40

    tel = esper_telemetry.attach(
        model=net,
        host=net.host,
        seeds={"probe": net.probe, "adapter": "adapter"},
        run=run,
        endpoint=daemon.endpoint,
    )
    try:
        ref_sq: dict[str, float] = {}
        host_only_sq = 0.0
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (32,))
            logits, probe_out, adapter_out = net(x[idx])
            host_loss = loss_fn(logits, y[idx])
            loss = host_loss + loss_fn(probe_out, y[idx]) + 3.0 * loss_fn(adapter_out, y[idx])
            if step == steps - 1:
                # Isolation is real in this model: the host's gradient is its own loss's.
                host_only = torch.autograd.grad(host_loss, params["host"], retain_graph=True)
                host_only_sq = float(sum(g.double().pow(2).sum() for g in host_only))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tel.capture(step=step)
            if step == steps - 1:
                ref_sq = {name: reference_sq(ps) for name, ps in params.items()}
            opt.step()

        assert tel.flush(5.0), f"collector did not flush: {tel.stats()}"
        latest = tel.latest()
        assert latest is not None and latest.step == steps - 1
        for name in GROUPS:
            assert latest.groups[name].sq == pytest.approx(ref_sq[name], rel=REL)

        def settled() -> dict[tuple, float] | None:
            expo = samples(metrics(daemon))
            return expo if get(expo, "esper_last_step", run=run) == steps - 1 else None

        expo = wait_until(settled, SETTLE_TIMEOUT_S, f"the daemon to export step {steps - 1}")
        stats = tel.stats()
        status, body = http_get(
            f"{daemon.web}/api/v1/runs/{urllib.parse.quote(run, safe='')}/history"
        )
        assert status == 200, body
        history = json.loads(body)
    finally:
        tel.close()

    assert host_only_sq == pytest.approx(ref_sq["host"], rel=1e-12)
    ref_norm = {name: math.sqrt(sq) for name, sq in ref_sq.items()}
    # Distinct norms, so an exporter that swapped or merged groups could not pass.
    ordered = sorted(ref_norm.values())
    assert all(b > a * 1.01 for a, b in zip(ordered, ordered[1:])), ref_norm
    for name in GROUPS:
        got = get(expo, "esper_grad_norm", run=run, group=name)
        assert got is not None, f"no esper_grad_norm for {name}"
        assert got == pytest.approx(ref_norm[name], rel=REL), name
        assert get(expo, "esper_group_has_gradient", run=run, group=name) == 1
        assert get(expo, "esper_group_parameters", run=run, group=name) == sum(
            p.numel() for p in params[name]
        )

    host_params = sum(p.numel() for p in params["host"])
    for seed in ("probe", "adapter"):
        seed_params = sum(p.numel() for p in params[seed])
        ratio = (ref_norm[seed] / ref_norm["host"]) * math.sqrt(host_params / seed_params)
        assert get(expo, "esper_seed_grad_ratio", run=run, seed=seed) == pytest.approx(
            ratio, rel=REL
        )
        assert get(expo, "esper_isolation_ok", run=run, group=seed) == 1
        for kind in ("gradient", "structural"):
            assert (
                get(expo, "esper_isolation_violations_total", run=run, group=seed, kind=kind) == 0
            )
    assert get(expo, "esper_isolation_ok", run=run, group="host") is None

    # The history API: every step in order, the last one the float64 reference's norm, and
    # the seeds' ratios at that step.
    assert history["run"] == run and history["last_step"] == steps - 1
    by = {g["name"]: g for g in history["groups"]}
    assert set(by) == set(GROUPS)
    for name in GROUPS:
        points = by[name]["points"]
        assert [s for s, _ in points] == list(range(steps)), name
        assert all(v is not None and v > 0 for _, v in points) and by[name]["nonfinite"] == []
        assert points[-1][1] == pytest.approx(ref_norm[name], rel=1e-6), name
    for seed in ("probe", "adapter"):
        seed_params = sum(p.numel() for p in params[seed])
        ratio = (ref_norm[seed] / ref_norm["host"]) * math.sqrt(host_params / seed_params)
        assert by[seed]["ratio"][-1][0] == steps - 1
        assert by[seed]["ratio"][-1][1] == pytest.approx(ratio, rel=1e-6), seed
    assert get(expo, "esper_captures_total", run=run) == steps
    assert stats["captures"] == steps and stats["dropped"] == 0 and stats["errors"] == 0


# -- the demo command -----------------------------------------------------------------------
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def test_demo_command_prints_a_table_of_every_group() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [
            *console_script("esper-telemetry", "esper_telemetry.commands.cli"),
            "demo",
            "--steps",
            "30",
            "--run",
            "e2e-demo",
        ],
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    elapsed = time.monotonic() - started
    report = (
        f"exit {proc.returncode} after {elapsed:.1f} s\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert proc.returncode == 0, report
    assert "step 30/30" in proc.stderr, report  # the progress indication reached the end
    # The first line says where to look: the metrics and the live page, on the same server.
    first = proc.stderr.splitlines()[0]
    m = re.fullmatch(
        r"esper-telemetryd ready: events tcp://\S+, metrics (http://\S+)/metrics, page (\S+)", first
    )
    assert m and m.group(2) == m.group(1) + "/", report
    assert "; live at " + m.group(1) + "/runs/e2e-demo" in proc.stderr, report

    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(rf"^(\S+)\s+(host|seed)\s+(\d+)\s+({_NUMBER})\s+(\S+)\s+(.+)$", line.strip())
        if m:
            rows[m.group(1)] = m.groups()[1:]
    assert "host" in rows and rows["host"][0] == "host", report
    seeds = {name: r for name, r in rows.items() if r[0] == "seed"}
    assert len(seeds) == 2, report
    for name, (role, params, norm, ratio, isolation) in rows.items():
        assert int(params) > 0 and math.isfinite(float(norm)) and float(norm) > 0, (name, report)
        if role == "seed":
            assert float(ratio) > 0 and isolation.strip() == "ok", (name, report)
    assert re.search(r"collector: captures=30 sent=\d+ dropped=0", proc.stdout), report
