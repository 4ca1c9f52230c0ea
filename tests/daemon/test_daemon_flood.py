"""A flood of junk run names against a real ``esper-telemetryd`` process, over real ZeroMQ,
and a real collector that arrives afterwards (issue 10, part 4).

Before fair admission, 50,000 junk names filled the run table for the whole TTL and a
collector arriving then had every event refused: 0 captures exported, only an anonymous
overflow counter. Now the junk runs, which never sent norms, give way: the collector's
captures are exported with the norms it measured, and the evictions are counted by reason.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import zmq

torch = pytest.importorskip("torch")
from daemon_support import get, hello  # noqa: E402
from live_daemon import LiveDaemon  # noqa: E402
from torch import nn  # noqa: E402

import esper_telemetry as et  # noqa: E402
from esper_telemetry import encode  # noqa: E402

pytestmark = pytest.mark.slow

JUNK = 50_000
BATCH = 250  # junk Hellos per message, well under the message size limit
MAX_RUNS = 100
STEPS = 5


def flood(endpoint: str) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)  # deliver everything before closing
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(endpoint)
        for start in range(0, JUNK, BATCH):
            sock.send(encode([hello(run=f"junk-{i:05d}") for i in range(start, start + BATCH)]))
        sock.close()
    finally:
        ctx.term()


def test_a_collector_arriving_after_a_run_name_flood_gets_its_captures_exported(tmp_path):
    daemon = LiveDaemon(tmp_path / "daemon.log", f"--limits.max-runs={MAX_RUNS}")
    try:
        base_rss = daemon.rss_bytes()
        flooding = threading.Thread(target=flood, args=(daemon.endpoint,))
        flooding.start()
        peak_rss = base_rss
        while flooding.is_alive():
            peak_rss = max(peak_rss, daemon.rss_bytes())
            time.sleep(0.01)
        s = daemon.scrape_until(
            lambda s: (get(s, "esper_daemon_events_total") or 0) >= JUNK,
            "the flood applied",
            timeout_s=30.0,
        )
        peak_rss = max(peak_rss, daemon.rss_bytes())
        print(
            f"RSS {base_rss / 2**20:.0f} -> peak {peak_rss / 2**20:.0f} MiB under {JUNK} run names"
        )
        assert peak_rss < 512 << 20
        assert get(s, "esper_daemon_runs") == MAX_RUNS
        evicted_by_flood = get(s, "esper_daemon_runs_evicted_total", reason="no_captures")

        torch.manual_seed(0)
        net = nn.ModuleDict({"host": nn.Linear(8, 8), "seed": nn.Linear(8, 2)})
        tel = et.attach(
            model=net, host="host", seeds={"seed": "seed"}, run="real", endpoint=daemon.endpoint
        )
        want = {}
        try:
            for step in range(STEPS):
                x = torch.randn(4, 8)
                loss = net["host"](x).pow(2).mean() + net["seed"](x).sum()
                net.zero_grad(set_to_none=True)
                loss.backward()
                want = {
                    name: math.sqrt(
                        sum(float(p.grad.double().pow(2).sum()) for p in net[name].parameters())
                    )
                    for name in ("host", "seed")
                }
                tel.capture(step)
            s = daemon.scrape_until(
                lambda s: get(s, "esper_captures_total", run="real") == STEPS,
                f"{STEPS} captures of the real run",
                timeout_s=15.0,
            )
        finally:
            tel.close()
        for name, norm in want.items():
            assert get(s, "esper_grad_norm", run="real", group=name) == pytest.approx(
                norm, rel=1e-5
            )
            assert get(s, "esper_group_last_step", run="real", group=name) == STEPS - 1
        assert get(s, "esper_last_step", run="real") == STEPS - 1
        assert evicted_by_flood == JUNK - MAX_RUNS
        # Its first event took the place of the longest-idle junk run; nothing was refused.
        assert (
            get(s, "esper_daemon_runs_evicted_total", reason="no_captures") == JUNK - MAX_RUNS + 1
        )
        assert get(s, "esper_daemon_overflow_total", what="runs") == 0
        assert get(s, "esper_daemon_runs") == MAX_RUNS
        # After its goodbye the run's final values stay, marked ended.
        s = daemon.scrape_until(
            lambda s: get(s, "esper_run_ended", run="real") == 1,
            "the real run marked ended",
            timeout_s=10.0,
        )
        assert get(s, "esper_captures_total", run="real") == STEPS
        assert get(s, "esper_collectors", run="real") == 0
    finally:
        assert daemon.stop() == 0, daemon.log()
