"""Every step counts, end to end: a training loop capturing 50+ times a second, the daemon's
console script, and a real Prometheus scraping every 5 s with the project's rule files.

One step in the middle carries a seed gradient 20 times the others. A scrape every 5 s reads
one capture in about 300, so the spike is in no ``esper_grad_norm`` sample, but the daemon's
window maximum holds it for a minute and its spike counter keeps it; the clipped count covers
every capture, not the scraped ones. The references are float64 norms of the very gradients
the collector read.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from deploy_support import Daemon, Prometheus, wait_until
from torch import nn

import esper_telemetry as et

pytestmark = pytest.mark.slow

RUN = "every-step"
STEPS = 2000
RATE = 60.0  # captures a second asked for (the loop sleeps to keep it)
SPIKE_STEP = STEPS // 2
SPIKE = 20.0


class Model:
    """A host and a seed on detached host features, trained by SGD on fresh batches."""

    def __init__(self) -> None:
        torch.manual_seed(2026)
        self.host = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
        self.seed = nn.Linear(32, 8)
        self.opt = torch.optim.SGD(
            list(self.host.parameters()) + list(self.seed.parameters()), lr=0.01
        )
        self.data = torch.Generator().manual_seed(7)

    def backward(self, i: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        x = torch.randn(64, 16, generator=self.data)
        y = torch.randn(64, 8, generator=self.data)
        features = self.host[1](self.host[0](x))
        out = self.host[2](features) + 0.5 * self.seed(features.detach())
        nn.functional.mse_loss(out, y).backward()
        if i == SPIKE_STEP:
            with torch.no_grad():
                for p in self.seed.parameters():
                    p.grad.mul_(SPIKE)

    def sq64(self) -> dict[str, float]:
        return {
            name: sum(float(p.grad.double().pow(2).sum()) for p in m.parameters())
            for name, m in (("host", self.host), ("seed", self.seed))
        }


def dry_run() -> list[float]:
    """The model norm of every step of the same (deterministic) run, without a collector."""
    m = Model()
    out = []
    for i in range(STEPS):
        m.backward(i)
        out.append(math.sqrt(sum(m.sq64().values())))
        m.opt.step()
    return out


def clip_between(norms: list[float]) -> float:
    """A threshold that about a third of the steps exceed, halfway between two of them."""
    s = sorted(norms)
    k = (2 * len(s)) // 3
    while s[k + 1] - s[k] < 1e-4 * s[k]:  # a gap far wider than float32 rounding
        k += 1
    return 0.5 * (s[k] + s[k + 1])


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded two-core box, two threads made a step of this tiny
    model 7x slower (12 ms against 1.7 ms), below 50 captures a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stack(tmp_path, one_thread):
    daemon = Daemon(tmp_path)
    prom = None
    try:
        prom = Prometheus(tmp_path, daemon.address, interval="5s")
        yield daemon, prom
    finally:
        if prom is not None:
            prom.close()
        daemon.close()


def test_every_step_spike_extremes_and_clipping_in_prometheus(stack) -> None:
    daemon, prom = stack
    clip = clip_between(dry_run())

    m = Model()
    tel = et.attach(
        model=None,
        host=m.host,
        seeds={"seed": m.seed},
        run=RUN,
        endpoint=daemon.endpoint,
        clip_threshold=clip,
        heartbeat_s=1.0,
    )
    ref: list[dict[str, float]] = []
    try:
        start = time.monotonic()
        for i in range(STEPS):
            m.backward(i)
            tel.capture(step=i)
            ref.append(m.sq64())
            m.opt.step()
            if i != SPIKE_STEP:  # the spike's capture is followed at once by the next one
                delay = start + (i + 1) / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        elapsed = time.monotonic() - start
        assert tel.flush(timeout_s=10)
    finally:
        tel.close()
    rate = STEPS / elapsed
    assert rate >= 50, f"{rate:.1f} captures a second"

    norms = {g: [math.sqrt(r[g]) for r in ref] for g in ("host", "seed")}
    model = [math.sqrt(r["host"] + r["seed"]) for r in ref]
    spike = norms["seed"][SPIKE_STEP]
    assert spike > 10 * max(norms["seed"][:SPIKE_STEP])  # the rule's factor, with room
    # The clip threshold splits the steps, away from float32 rounding of any of them.
    clipped = sum(n > clip for n in model)
    assert 0 < clipped < STEPS
    assert min(abs(n - clip) / clip for n in model) > 1e-5

    sel = f'run="{RUN}"'
    last = STEPS - 1
    # A scrape after the last capture (every figure below comes from one snapshot).
    wait_until(
        lambda: prom.value(f"esper_last_step{{{sel}}}") == last,
        15,
        f"esper_last_step == {last} in Prometheus",
        interval_s=0.5,
    )

    def value(expr: str) -> float:
        v = prom.value(expr)
        assert v is not None, f"{expr} selects nothing"
        return v

    seed_sel, host_sel = f'{sel},group="seed"', f'{sel},group="host"'
    window_max = value(f"max_over_time(esper_grad_norm_max{{{seed_sel}}}[5m])")
    assert math.isclose(window_max, spike, rel_tol=1e-6), (window_max, spike)
    sampled = value(f"max_over_time(esper_grad_norm{{{seed_sel}}}[5m])")
    assert sampled < spike / 2, (sampled, spike)  # no scrape read the spike itself
    window_min = value(f"min_over_time(esper_grad_norm_min{{{host_sel}}}[5m])")
    assert math.isclose(window_min, min(norms["host"]), rel_tol=1e-6), (
        window_min,
        min(norms["host"]),
    )
    assert value(f"esper_grad_norm_spikes_total{{{seed_sel}}}") == 1.0
    assert value(f"esper_grad_norm_spikes_total{{{host_sel}}}") == 0.0
    model_norm = value(f"esper_model_grad_norm{{{sel}}}")
    assert math.isclose(model_norm, model[-1], rel_tol=1e-6), (model_norm, model[-1])
    assert value(f"esper_grad_clip_threshold{{{sel}}}") == pytest.approx(clip, rel=1e-12)
    assert value(f"esper_model_steps_total{{{sel}}}") == STEPS
    assert value(f"esper_grad_clipped_total{{{sel}}}") == clipped

    def spike_alert() -> list[dict]:
        return [
            a
            for a in prom.alerts("EsperGradNormSpike", run=RUN)
            if a["state"] in ("pending", "firing")
        ]

    alerts = wait_until(spike_alert, 15, "EsperGradNormSpike pending or firing", 0.5)
    assert {a["labels"]["group"] for a in alerts} == {"seed"}
    active = prom.query(f'ALERTS{{alertname="EsperGradNormSpike",{sel}}}')
    assert {r["metric"]["group"] for r in active} == {"seed"}
    print(
        f"\n{STEPS} captures at {rate:.1f}/s; spike {spike:.6g} (seed's sampled max "
        f"{sampled:.6g}); host min {min(norms['host']):.6g}; clipped {clipped} of {STEPS} "
        f"at {clip:.6g}"
    )
