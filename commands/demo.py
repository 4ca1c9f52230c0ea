"""``esper-telemetry demo``: a daemon, a small training job with the collector, and a table.

The whole path on one machine: start ``esper-telemetryd`` on free loopback ports (the first
line names its metrics URL and its live page, ``http://127.0.0.1:PORT/``), train a host
network with two seed modules (each trained on detached host features, so isolation holds)
for a bounded number of steps with the collector attached, scrape the daemon's
``/metrics`` and print what it exports per group. The daemon is always stopped, whatever
happens; every wait is bounded, so the demo ends by itself.
"""

from __future__ import annotations

import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TypeVar

import torch
from torch import nn

from esper_telemetry.collector import attach

from .daemon_process import DaemonProcess, DaemonStartError, http_get

__all__ = [
    "DemoError",
    "HostNet",
    "DemoNet",
    "run_demo",
    "GroupRow",
    "read_rows",
    "format_table",
]

_T = TypeVar("_T")

SETTLE_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 2.0
SEED_NAMES = ("seed_probe", "seed_mlp")


class DemoError(Exception):
    """A failure the demo reports as one line (the daemon did not start, no data arrived)."""


# -- the daemon ---------------------------------------------------------------------------
def wait_for(
    predicate: Callable[[], _T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> _T:
    """Poll ``predicate`` until it returns something other than None; DemoError after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def start_daemon() -> DaemonProcess:
    """``esper-telemetryd`` on loopback ports the kernel picks, ready; DemoError otherwise."""
    try:
        daemon = DaemonProcess()
        daemon.wait_ready()
    except DaemonStartError as exc:
        last = [line for line in str(exc).splitlines() if line.strip()]
        raise DemoError(last[-1] if last else str(exc)) from None
    return daemon


def scrape(daemon: DaemonProcess) -> str:
    status, body = http_get(daemon.url, HTTP_TIMEOUT_S)
    if status != 200:
        raise DemoError(f"GET {daemon.url} answered {status or 'nothing'}")
    return body


# -- the training job ---------------------------------------------------------------------
class HostNet(nn.Module):
    """The host: a feature trunk and a classifier head; returns ``(logits, features)``."""

    def __init__(self, d_in: int, d_hidden: int, n_classes: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_hidden), nn.Tanh()
        )
        self.head = nn.Linear(d_hidden, n_classes)

    def forward(self, x: torch.Tensor) -> tuple:
        features = self.trunk(x)
        return self.head(features), features


class DemoNet(nn.Module):
    """A host classifier and two seeds that learn the same labels from its detached features.

    The seeds stand for modules grown next to a host: they read the host's features but
    must not send gradient back into it, hence ``features.detach()``.
    """

    def __init__(self, d_in: int = 32, d_hidden: int = 64, n_classes: int = 4) -> None:
        super().__init__()
        self.d_in, self.n_classes = d_in, n_classes
        self.host = HostNet(d_in, d_hidden, n_classes)
        self.seeds = nn.ModuleDict(
            {
                SEED_NAMES[0]: nn.Linear(d_hidden, n_classes),
                SEED_NAMES[1]: nn.Sequential(
                    nn.Linear(d_hidden, 16), nn.ReLU(), nn.Linear(16, n_classes)
                ),
            }
        )

    def forward(self, x: torch.Tensor) -> tuple:
        logits, features = self.host(x)
        detached = features.detach()
        return logits, {name: seed(detached) for name, seed in self.seeds.items()}


def make_data(
    n: int, d_in: int, n_classes: int, device: torch.device, generator: torch.Generator
) -> tuple:
    """A fixed synthetic classification set: labels from a random linear teacher."""
    x = torch.randn(n, d_in, generator=generator)
    teacher = torch.randn(d_in, n_classes, generator=generator)
    y = (x @ teacher).argmax(dim=1)
    return x.to(device), y.to(device)


class Progress:
    """An in-place progress bar on a terminal; a line per quarter otherwise (logs, pipes)."""

    def __init__(self, total: int, stream: IO[str], width: int = 30) -> None:
        self.total = max(1, total)
        self.stream = stream
        self.width = width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self._quarter = -1

    def update(self, done: int, loss: float) -> None:
        final = done >= self.total
        if self.tty:
            now = time.monotonic()
            if not final and now - self._last < 0.1:
                return
            self._last = now
            filled = int(self.width * done / self.total)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\rtraining [{bar}] step {done}/{self.total}  loss {loss:.4f}")
            if final:
                self.stream.write("\n")
        else:
            quarter = 4 * done // self.total
            if quarter == self._quarter:
                return
            self._quarter = quarter
            self.stream.write(f"training: step {done}/{self.total}  loss {loss:.4f}\n")
        self.stream.flush()


def train(tel, net: DemoNet, steps: int, device: torch.device, progress: Progress) -> int:
    """Train ``steps`` steps, capturing after every backward; returns the last step."""
    gen = torch.Generator().manual_seed(0)
    x, y = make_data(512, net.d_in, net.n_classes, device, gen)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    batch = 64
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen).to(device)
        logits, seed_logits = net(x[idx])
        host_loss = loss_fn(logits, y[idx])
        loss = host_loss + sum(loss_fn(out, y[idx]) for out in seed_logits.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tel.capture(step=step)
        opt.step()
        progress.update(step + 1, host_loss.item())
    return steps - 1


# -- the table ----------------------------------------------------------------------------
@dataclass
class GroupRow:
    """One group as the daemon exports it (None where the daemon has no sample)."""

    group: str
    role: str
    params: float | None
    norm: float | None
    ratio: float | None
    isolation_ok: float | None
    violations: float


def parse_samples(text: str) -> dict[str, list[tuple]]:
    """``{sample name: [(labels, value), ...]}`` from a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(samples: dict[str, list[tuple]], name: str, **labels: str) -> float | None:
    for got, value in samples.get(name, ()):
        if all(got.get(k) == v for k, v in labels.items()):
            return value
    return None


def read_rows(text: str, run: str, roles: dict[str, str]) -> list[GroupRow]:
    """The table's rows for ``run``, in the order of ``roles`` (group name -> role)."""
    s = parse_samples(text)
    rows = []
    for group, role in roles.items():
        violations = sum(
            v
            for labels, v in s.get("esper_isolation_violations_total", ())
            if labels.get("run") == run and labels.get("group") == group
        )
        rows.append(
            GroupRow(
                group=group,
                role=role,
                params=_value(s, "esper_group_parameters", run=run, group=group),
                norm=_value(s, "esper_grad_norm", run=run, group=group),
                ratio=_value(s, "esper_seed_grad_ratio", run=run, seed=group),
                isolation_ok=_value(s, "esper_isolation_ok", run=run, group=group),
                violations=violations,
            )
        )
    return rows


def _isolation(row: GroupRow) -> str:
    if row.isolation_ok is None:
        return "-"
    if row.isolation_ok == 0:
        return f"VIOLATED ({row.violations:.0f})"
    return "ok" if not row.violations else f"ok now ({row.violations:.0f} earlier)"


def format_table(rows: list[GroupRow]) -> str:
    """A fixed-width table: group, role, params, grad norm, seed/host ratio, isolation."""
    header = ("group", "role", "params", "grad norm", "seed/host ratio", "isolation")
    body = [
        (
            r.group,
            r.role,
            "-" if r.params is None else f"{r.params:.0f}",
            "no gradient" if r.norm is None else f"{r.norm:.6g}",
            "-" if r.ratio is None else f"{r.ratio:.4f}",
            _isolation(r),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    numeric = {2, 3, 4}

    def fmt(line: tuple) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


# -- the whole demo -------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {name}: CUDA is not available here")
    return device


def run_demo(
    steps: int = 200,
    device: str = "auto",
    run: str | None = None,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """Run the demo end to end; returns 0, or raises DemoError with a one-line reason."""
    if steps < 1:
        raise DemoError(f"--steps must be >= 1, got {steps}")
    dev = pick_device(device)
    run = run or f"demo-{uuid.uuid4().hex[:8]}"
    daemon = start_daemon()
    try:
        err.write(
            f"esper-telemetryd ready: events {daemon.endpoint}, metrics {daemon.web}/metrics, "
            f"page {daemon.web}/\n"
        )
        torch.manual_seed(0)
        net = DemoNet().to(dev)
        groups = {"host": "host", **{name: "seed" for name in SEED_NAMES}}
        tel = attach(
            model=net,
            host=net.host,
            seeds={name: f"seeds.{name}" for name in SEED_NAMES},
            run=run,
            endpoint=daemon.endpoint,
        )
        try:
            page = f"{daemon.web}/runs/{urllib.parse.quote(run, safe='')}"
            err.write(f"run {run}: training {steps} steps on {dev}; live at {page}\n")
            started = time.monotonic()
            last_step = train(tel, net, steps, dev, Progress(steps, err))
            elapsed = time.monotonic() - started
            if not tel.flush(5.0):
                raise DemoError("the collector did not hand its events to the socket within 5 s")

            # Scrape once the daemon has applied the last capture, before close() says
            # goodbye (a run whose every rank said goodbye leaves the exposition).
            def settled() -> str | None:
                text = scrape(daemon)
                got = _value(parse_samples(text), "esper_last_step", run=run)
                return text if got is not None and got >= last_step else None

            text = wait_for(
                settled, SETTLE_TIMEOUT_S, f"the daemon to export step {last_step} of run {run}"
            )
            stats = tel.stats()
        finally:
            tel.close()
        rows = read_rows(text, run, groups)
        samples = parse_samples(text)
        received = _value(samples, "esper_captures_total", run=run)
        dropped = _value(samples, "esper_collector_dropped_events_total", run=run)
        out.write(
            f"\nrun {run}: {steps} steps on {dev} in {elapsed:.1f} s; "
            f"metrics scraped from {daemon.web}/metrics at step {last_step}\n\n"
        )
        out.write(format_table(rows) + "\n\n")
        out.write(
            f"collector: captures={stats['captures']} sent={stats['sent']} "
            f"dropped={stats['dropped']} errors={stats['errors']}; "
            f"daemon: captures={received if received is None else int(received)} "
            f"reported dropped={dropped if dropped is None else int(dropped)}\n"
        )
        out.flush()
        missing = [r.group for r in rows if r.norm is None]
        if missing:
            raise DemoError(f"the daemon exports no gradient norm for {', '.join(missing)}")
        return 0
    finally:
        daemon.stop()
