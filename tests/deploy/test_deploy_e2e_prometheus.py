"""End to end with real processes: a training script with the collector, the daemon's console
script, and a real Prometheus server scraping it and evaluating the deployed alert rules.

Prometheus runs on a free loopback port with its own temporary storage and a generated
configuration (scrape and rule evaluation every second); it loads the real rules file.
The isolation alert has no ``for:``, so it turns pending or firing within seconds.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import (
    DASHBOARD,
    ROOT,
    Daemon,
    Prometheus,
    grafana_to_promql,
    stop,
    wait_until,
)

pytestmark = pytest.mark.slow

TRAIN = Path(__file__).with_name("train_e2e.py")
RUN = "e2e-isolation"


class Trainer:
    """train_e2e.py as a subprocess, driven through stdin, its stdout read by a thread."""

    def __init__(self, tmp: Path, endpoint: str) -> None:
        self.out = tmp / "reference.json"
        self.lines: queue.Queue[str] = queue.Queue()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(TRAIN),
                "--run",
                RUN,
                "--endpoint",
                endpoint,
                "--out",
                str(self.out),
                "--steps",
                "5",
                "--leak-steps",
                "3",
                "--wait-s",
                "90",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.output.append(line)
            self.lines.put(line.strip())

    def expect(self, marker: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"training script did not print {marker!r}:\n{''.join(self.output)}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    pytest.fail(
                        f"training script exited with {self.proc.returncode}:\n"
                        + "".join(self.output)
                    )
                continue
            if line == marker:
                return json.loads(self.out.read_text())

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> int | None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        return stop(self.proc)


@pytest.fixture
def stack(tmp_path) -> Iterator[dict[str, object]]:
    daemon = Daemon(tmp_path)
    prom = trainer = None
    try:
        prom = Prometheus(tmp_path, daemon.address)
        trainer = Trainer(tmp_path, daemon.endpoint)
        yield {"daemon": daemon, "prometheus": prom, "trainer": trainer}
    finally:
        if trainer is not None:
            trainer.close()
        if prom is not None:
            prom.close()
        daemon.close()


def test_training_to_prometheus_norms_and_isolation_alert(stack) -> None:
    daemon: Daemon = stack["daemon"]  # type: ignore[assignment]
    prom: Prometheus = stack["prometheus"]  # type: ignore[assignment]
    trainer: Trainer = stack["trainer"]  # type: ignore[assignment]

    # Prometheus scrapes the daemon.
    wait_until(
        lambda: prom.value('up{job="esper-telemetryd"}') == 1.0,
        20,
        "Prometheus to scrape the daemon",
    )

    # --- clean phase: the norms in Prometheus are the float64 reference of the last step.
    ref = trainer.expect("READY clean", 90)
    assert ref["flushed"] is True
    last = ref["step"]
    sel = f'run="{RUN}"'
    wait_until(
        lambda: prom.value(f"esper_last_step{{{sel}}}") == last,
        20,
        f"esper_last_step{{{sel}}} == {last} in Prometheus",
    )
    host = wait_until(
        lambda: prom.value(f'esper_grad_norm{{{sel},group="host"}}'),
        10,
        "esper_grad_norm{group=host} in Prometheus",
    )
    assert math.isclose(host, ref["norms"]["host"], rel_tol=1e-5), (host, ref["norms"])
    seed = prom.value(f'esper_grad_norm{{{sel},group="seed"}}')
    assert seed is not None and math.isclose(seed, ref["norms"]["seed"], rel_tol=1e-5)
    # The frozen group has no gradient: no norm, has_gradient 0, isolation intact.
    assert ref["norms"]["frozen"] is None
    assert prom.value(f'esper_grad_norm{{{sel},group="frozen"}}') is None
    assert prom.value(f'esper_group_has_gradient{{{sel},group="frozen"}}') == 0.0
    assert prom.value(f'esper_isolation_ok{{{sel},group="frozen"}}') == 1.0
    for group, n in ref["params"].items():
        assert prom.value(f'esper_group_parameters{{{sel},group="{group}"}}') == n
    ratio = prom.value(f'esper_seed_grad_ratio{{{sel},seed="seed"}}')
    expected = (ref["norms"]["seed"] / ref["norms"]["host"]) * math.sqrt(
        ref["params"]["host"] / ref["params"]["seed"]
    )
    assert ratio is not None and math.isclose(ratio, expected, rel_tol=1e-5)
    assert prom.value(f"esper_collectors{{{sel}}}") == 1.0
    assert prom.alerts("EsperIsolationViolation", run=RUN) == []

    # Every dashboard query is accepted by this real Prometheus, and the per-run gradient
    # panel shows this run.
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    shown = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            result = prom.query(grafana_to_promql(target["expr"]))
            if panel["title"] == "Gradient norm by group":
                shown = result
    assert {r["metric"]["group"] for r in shown} >= {"host", "seed"}

    # --- leak phase: gradient reaches the isolated group; the alert goes pending/firing.
    trainer.send("leak")
    leaked = trainer.expect("READY leak", 60)
    assert leaked["norms"]["frozen"] is not None and leaked["norms"]["frozen"] > 0
    wait_until(
        lambda: prom.value(
            f'esper_isolation_violations_total{{{sel},group="frozen",kind="gradient"}}'
        ),
        20,
        "esper_isolation_violations_total{group=frozen,kind=gradient} > 0 in Prometheus",
    )

    def alert_state() -> str | None:
        states = {
            a["state"] for a in prom.alerts("EsperIsolationViolation", run=RUN, group="frozen")
        }
        return "firing" if "firing" in states else ("pending" if "pending" in states else None)

    state = wait_until(alert_state, 20, "EsperIsolationViolation pending or firing")
    assert state in ("pending", "firing")
    (alert,) = prom.alerts("EsperIsolationViolation", run=RUN, group="frozen")
    assert alert["labels"]["severity"] == "critical"
    # Only the leaking group: host and seed stay clean.
    assert prom.alerts("EsperIsolationViolation", run=RUN, group="host") == []
    assert prom.alerts("EsperIsolationViolation", run=RUN, group="seed") == []

    # --- goodbye: the script closes its collector and exits 0; the daemon stops on
    # SIGTERM with 0.
    trainer.send("exit")
    assert trainer.proc.wait(30) == 0, "".join(trainer.output)
    assert daemon.close() == 0, daemon.log()
