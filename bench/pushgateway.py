"""The peer a user would otherwise pick: Prometheus Pushgateway, side by side with the
collector and daemon, each empty and with about 10,000 series resident.

    python bench/pushgateway.py [--seconds S] [--trials T] [--resident N] [--write]

Pushgateway (Debian's ``prometheus-pushgateway``, on its own port with its own persistence
file): one HTTP PUT per training step of the same three groups' norms over one keep-alive
connection, as a training loop would push, timed back to back. esper-telemetry: one
``capture()`` per step on a real collector attached to a small model (three groups, CPU),
its events delivered over ZeroMQ to a real ``esper-telemetryd``; the rate counts a capture
only once the daemon's ``esper_captures_total`` shows it (fully delivered), and the
collector's drops are reported. Four targets, interleaved trial by trial; medians.
``--write`` puts the table in bench/RESULTS.md (section "## Pushgateway"; others kept).
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import zmq
from report import machine, write_section

import esper_telemetry as et
from esper_telemetry import GroupNorm, Hello, Norms, encode
from esper_telemetry.commands.daemon_process import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Pushgateway"
GROUPS = ("host", "seed0", "seed1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Gateway:
    """A Pushgateway process on a free port, persisting to its own file."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
        if binary is None:
            raise SystemExit(
                "needs prometheus-pushgateway (apt-get install prometheus-pushgateway)"
            )
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--persistence.file={workdir / f'pgw-{self.port}.db'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_http(f"http://127.0.0.1:{self.port}/-/ready")
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def push(self, path: str, body: bytes) -> None:
        self.conn.request("PUT", path, body=body, headers={"Content-Type": "text/plain"})
        resp = self.conn.getresponse()
        resp.read()
        if resp.status not in (200, 202):
            raise RuntimeError(f"pushgateway answered {resp.status}")

    def fill(self, series: int) -> None:
        per = 100
        for g in range(series // per):
            body = "".join(f'resident_metric{{i="{i}"}} {i}\n' for i in range(per)).encode()
            self.push(f"/metrics/job/resident/instance/i{g}", body)

    def close(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(10)


def _step_body(step: int) -> bytes:
    lines = ["# TYPE esper_grad_norm gauge"]
    lines += [f'esper_grad_norm{{group="{g}"}} {1.0 + (step % 7) / 10:.6g}' for g in GROUPS]
    lines += ["# TYPE esper_last_step gauge", f"esper_last_step {step}"]
    return ("\n".join(lines) + "\n").encode()


def pushgateway_trial(gw: Gateway, seconds: float) -> tuple[float, int]:
    """Pushes per second, back to back, for ``seconds``."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        gw.push("/metrics/job/train/run/bench/rank/0", _step_body(n))
        n += 1
    return n / (time.perf_counter() - t0), 0


class Daemon(DaemonProcess):
    """An ``esper-telemetryd`` process on random loopback ports, its log under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            command=[sys.executable, "-m", "esper_telemetry.daemon"],
            log_path=workdir / f"daemon-{time.monotonic_ns()}.log",
            cwd=ROOT,
        )

    def scrape(self) -> str:
        return urllib.request.urlopen(self.url, timeout=30).read().decode()

    def captures(self, run: str) -> float:
        m = re.search(
            rf'^esper_captures_total{{run="{re.escape(run)}"}} (\S+)$', self.scrape(), re.M
        )
        return float(m.group(1)) if m else 0.0

    def fill(self, series: int) -> int:
        """Synthetic runs until the exposition holds about ``series`` samples; how many."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(self.endpoint)
        groups = tuple(
            GroupNorm(f"g{i:02d}", "group", 100, 1.0, 0, False, False) for i in range(50)
        )
        r = 0
        count = 0
        while count < series:
            for _ in range(5):
                run = f"resident-{r}"
                sock.send(encode(Hello(run, 0, time.time(), 1, "h", 1, "v", "t", ()), seq=0))
                sock.send(encode(Norms(run, 0, time.time(), 1, False, groups), seq=1))
                r += 1
            time.sleep(0.2)
            count = sum(1 for line in self.scrape().splitlines() if line and line[0] != "#")
        sock.close()
        ctx.term()
        return count

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.ModuleDict({g: nn.Linear(64, 64) for g in GROUPS})
    x = torch.randn(8, 64)
    sum(m(x).pow(2).mean() for m in net.values()).backward()
    return net


def esper_trial(daemon: Daemon, seconds: float, trial: int) -> tuple[float, int]:
    """Captures per second, counted once the daemon shows them; and the collector's drops."""
    net = _model()
    run = f"bench-{trial}-{time.monotonic_ns()}"
    tel = et.attach(
        model=net,
        host="host",
        seeds={"seed0": "seed0", "seed1": "seed1"},
        run=run,
        endpoint=daemon.endpoint,
    )
    try:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            tel.capture(n)
            n += 1
        deadline = time.monotonic() + 60
        dropped = 0
        while True:
            got = daemon.captures(run)
            dropped = tel.stats()["dropped"]
            if got + dropped >= n or time.monotonic() > deadline:
                break
            time.sleep(0.01)  # a scrape of the resident series costs the daemon: not too often
        elapsed = time.perf_counter() - t0
    finally:
        tel.close()
    return got / elapsed, int(dropped)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--resident", type=int, default=10_000)
    ap.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="esper-pgw-"))
    started: list = []
    try:
        for make in (Gateway, Gateway, Daemon, Daemon):
            started.append(make(work))
        gw_empty, gw_full, d_empty, d_full = started
        gw_full.fill(args.resident)
        resident = d_full.fill(args.resident)
        targets: dict[str, Callable[[int], tuple[float, int]]] = {
            "pushgateway, empty": lambda t: pushgateway_trial(gw_empty, args.seconds),
            f"pushgateway, {args.resident:,} series resident": lambda t: pushgateway_trial(
                gw_full, args.seconds
            ),
            "esper-telemetry, empty": lambda t: esper_trial(d_empty, args.seconds, t),
            f"esper-telemetry, {resident:,} series resident": lambda t: esper_trial(
                d_full, args.seconds, t
            ),
        }
        for name in targets:  # warm-up, untimed: first attach, first plan, first connection
            targets[name](-1)
        rates: dict[str, list[float]] = {k: [] for k in targets}
        drops: dict[str, int] = {k: 0 for k in targets}
        for t in range(args.trials):
            order = list(targets) if t % 2 == 0 else list(reversed(targets))
            for name in order:
                rate, dropped = targets[name](t)
                rates[name].append(rate)
                drops[name] += dropped
                print(
                    f"trial {t}: {name}: {rate:,.0f}/s"
                    + (f" ({dropped} dropped)" if dropped else ""),
                    flush=True,
                )
    finally:
        for p in started:
            p.close()
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        f"| {name} | {statistics.median(r):,.0f} | {drops[name]} |" for name, r in rates.items()
    ]
    section = "\n".join(
        [
            SECTION,
            "",
            f"`python bench/pushgateway.py` ({time.strftime('%Y-%m-%d')}). Machine: {machine()}; "
            "Pushgateway "
            + _pgw_version()
            + ". Telemetry of one training step (three groups' norms), "
            "back to back; medians of "
            f"{args.trials} interleaved trials of {args.seconds:g} s after an untimed one. "
            "Pushgateway: one HTTP PUT per step over a keep-alive connection. esper-telemetry: "
            "one `capture()` per step (CPU, small model), counted when the daemon's scrape shows "
            "it.",
            "",
            "| target | steps/s (median) | dropped (all trials) |",
            "|---|---:|---:|",
            *rows,
            "",
            "Dropped: captures the collector skipped and counted because its completion thread was "
            "behind (at most 4,096 CPU captures, or 8 MiB of them, wait). A loop that does "
            "nothing but call `capture()` holds the GIL and starves that thread; a training step "
            "spends its time in torch ops that release it. Pushgateway's pushes block the loop "
            "instead of dropping.",
            "",
            "All trials: "
            + "; ".join(f"{k}: " + ", ".join(f"{v:,.0f}" for v in r) for k, r in rates.items())
            + ".",
            "",
        ]
    )
    print(section)
    if args.write:
        write_section(SECTION, section)
    return 0


def _pgw_version() -> str:
    binary = shutil.which("prometheus-pushgateway") or "pushgateway"
    done = subprocess.run([binary, "--version"], capture_output=True, text=True)
    out = done.stdout + done.stderr
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "(version unknown)"


if __name__ == "__main__":
    sys.exit(main())
