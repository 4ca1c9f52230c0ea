"""Benchmark scrapes over HTTP: the daemon against prometheus_client's own server, same series.

    python bench/scrape.py [--trials T] [--sizes 10000,100000] [--baseline PYTHONPATH] [--write]

Starts ``esper-telemetryd`` (``python -m esper_telemetry.daemon``) as a subprocess and fills
it over ZeroMQ with runs of 100 groups (a host, 19 isolated seeds, 80 plain groups) until
it holds about the requested number of series; starts a second process that applies the
same events to the same aggregator code and serves them with prometheus_client's own
``start_http_server`` (a collector that builds the runs' families from a fresh snapshot
per scrape, as the daemon does, plus the process collectors; the daemon's own few dozen
series aside). Then, per trial, interleaved, every server is
scraped once in each of four ways on a kept-alive connection:

- ``text``: ``Accept: text/plain;version=0.0.4``, no compression;
- ``text+gzip``: the same with ``Accept-Encoding: gzip``;
- ``openmetrics``: the ``Accept`` header Prometheus 2.42 sends (OpenMetrics first);
- ``prometheus``: that header with gzip, exactly what Prometheus 2.42 asks.

A scrape's time runs from sending the request to the last byte of the body (not
decompressed: that is the scraper's cost). Medians over the trials, and the ratio of
prometheus_client's median to the daemon's. ``--baseline PATH`` adds a third server: the
daemon run with ``PYTHONPATH=PATH`` first (an older tree laid out as the installed
package, ``esper_telemetry/{,daemon/,collector/}``), for before/after in the same run.
Prints a markdown section; ``--write`` puts it into bench/RESULTS.md as "## Scrape"
(other sections kept).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import machine, write_section  # noqa: E402

from esper_telemetry.commands.daemon_process import DaemonProcess, DaemonStartError  # noqa: E402

SECTION = "## Scrape"
GROUPS = 100
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
WAYS = {
    "text": ("text/plain;version=0.0.4", "identity"),
    "text+gzip": ("text/plain;version=0.0.4", "gzip"),
    "openmetrics": (PROMETHEUS_ACCEPT, "identity"),
    "prometheus": (PROMETHEUS_ACCEPT, "gzip"),
}
SERIES_PER_RUN = 687  # runs of GROUPS groups as _events makes them, the run's own included


def _events(runs: int):
    """Per run, a Hello declaring its groups and one capture of every group."""
    from esper_telemetry import GroupDecl, GroupNorm, Hello, Norms

    for r in range(runs):
        run = f"bench-run-{r:04d}"
        decls = tuple(
            GroupDecl(
                f"group-{g:03d}",
                "host" if g == 0 else ("seed" if g <= 19 else "group"),
                1000 + g,
                0 < g <= 19,
            )
            for g in range(GROUPS)
        )
        norms = tuple(
            GroupNorm(d.name, d.role, d.params, 1.0 + 0.37 * i, 0, False, d.isolated)
            for i, d in enumerate(decls)
        )
        yield [
            Hello(run, 0, 1.7e9, 1, "bench", 1, "0", "", decls),
            Norms(run, 0, 1.7e9 + r, 1000 + r, False, norms),
        ]


def _fill(endpoint: str, runs: int) -> None:
    import zmq

    from esper_telemetry import encode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(endpoint)
    for events in _events(runs):
        sock.send(encode(events))
    sock.close()
    ctx.term()


def _serve_prometheus_client(runs: int) -> None:
    """The peer: the same events, the same aggregator, prometheus_client's own server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from esper_telemetry.daemon.aggregator import Aggregator
    from esper_telemetry.daemon.app import limits
    from esper_telemetry.daemon.config import Config
    from esper_telemetry.daemon.exporter import RUN_FAMILIES, Exposition, process_registry
    from esper_telemetry.daemon.stats import DaemonStats

    agg = Aggregator(limits(Config(max_runs=max(runs, 100), max_groups_per_run=256)), DaemonStats())
    for events in _events(runs):
        agg.apply_batch(events, time.monotonic())
    exposition = Exposition(10**9)

    class Live:
        def collect(self):
            # A fresh snapshot per scrape, as the daemon takes one, and the runs' series as
            # the daemon makes them (its rows), as prometheus_client's metric families.
            families = [
                (CounterMetricFamily if f.type == "counter" else GaugeMetricFamily)(
                    f.name, f.help, labels=list(f.labels)
                )
                for f in RUN_FAMILIES
            ]
            for _, rows in exposition.scrape(agg.snapshot()).runs:
                for family, family_rows in zip(families, rows):
                    for labels, value in family_rows:
                        family.add_metric(list(labels), value)
            yield from families

    registry = CollectorRegistry()
    registry.register(Live())
    registry.register(process_registry())
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    print(f"listening 127.0.0.1:{server.server_port}", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin


class Server:
    """One server under test, a kept-alive connection to it, and its timings."""

    def __init__(self, name: str, proc: subprocess.Popen, web: str) -> None:
        self.name, self.proc, self.web = name, proc, web
        host, port = web.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def scrape(self, accept: str, encoding: str) -> tuple[float, bytes, dict[str, str]]:
        t0 = time.perf_counter()
        try:
            self.conn.request(
                "GET", "/metrics", headers={"Accept": accept, "Accept-Encoding": encoding}
            )
            resp = self.conn.getresponse()
            body = resp.read()
        except (http.client.HTTPException, ConnectionError):  # a server that closed: once more
            self.conn.close()
            t0 = time.perf_counter()
            self.conn.request(
                "GET", "/metrics", headers={"Accept": accept, "Accept-Encoding": encoding}
            )
            resp = self.conn.getresponse()
            body = resp.read()
        took = time.perf_counter() - t0
        if resp.status != 200:
            raise SystemExit(f"{self.name}: /metrics answered {resp.status}")
        return took, body, {k.lower(): v for k, v in resp.getheaders()}

    def close(self) -> None:
        self.conn.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _start_daemon(name: str, runs: int, pythonpath: str = "") -> Server:
    args = [
        f"--limits.max-runs={max(runs, 100)}",
        "--limits.max-groups-per-run=256",
        "--run.ttl-seconds=3600",
    ]
    if not pythonpath:
        args.append("--web.max-series=1000000")
    env = {"PYTHONPATH": pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        d = DaemonProcess(
            *args,
            command=[sys.executable, "-m", "esper_telemetry.daemon"],
            env=env if pythonpath else None,
            cwd="/" if pythonpath else ROOT,
        )
    except DaemonStartError as exc:
        raise SystemExit(f"{name} did not start: {exc}") from None
    _fill(",".join(d.endpoints), runs)
    return Server(name, d.proc, d.web.removeprefix("http://"))


def _start_peer(runs: int) -> Server:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-prometheus-client", str(runs)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    m = re.search(r"listening (\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"prometheus_client server did not start: {line}")
    return Server("prometheus_client", proc, m.group(1))


def _series(server: Server) -> int:
    _, body, _ = server.scrape("text/plain;version=0.0.4", "identity")
    return sum(1 for ln in body.decode().splitlines() if ln and not ln.startswith("#"))


def _wait_filled(server: Server, series: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = _series(server)
        if n >= series or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def _check(server: Server) -> None:
    """What each way negotiated, said once: content type and encoding."""
    for way, (accept, encoding) in WAYS.items():
        _, body, headers = server.scrape(accept, encoding)
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        print(
            f"  {server.name:18s} {way:12s} -> {headers.get('content-type')}"
            f"{', gzip' if headers.get('content-encoding') == 'gzip' else ''}, "
            f"{len(body):,} bytes",
            flush=True,
        )


def _machine() -> str:
    from importlib.metadata import version

    return machine(
        f"prometheus_client {version('prometheus_client')}", f"aiohttp {version('aiohttp')}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=7, help="scrapes per server and way (>= 5)")
    ap.add_argument("--sizes", default="10000,100000", help="series to hold, comma-separated")
    ap.add_argument(
        "--baseline",
        default="",
        help="PYTHONPATH of an older tree: its daemon is measured beside this one",
    )
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    ap.add_argument("--serve-prometheus-client", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_prometheus_client:
        _serve_prometheus_client(args.serve_prometheus_client)
        return 0

    rows: list[str] = []
    notes: list[str] = []
    for size in (int(s) for s in args.sizes.split(",")):
        runs = max(1, round(size / SERIES_PER_RUN))
        servers = [_start_daemon("esper-telemetryd", runs), _start_peer(runs)]
        if args.baseline:
            servers.insert(1, _start_daemon("esper-telemetryd before", runs, args.baseline))
        try:
            counts = {s.name: _wait_filled(s, runs * SERIES_PER_RUN) for s in servers}
            print(
                f"{runs} runs of {GROUPS} groups: series "
                + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
                flush=True,
            )
            for s in servers:
                _check(s)
            times: dict[tuple[str, str], list[float]] = {}
            sizes: dict[tuple[str, str], int] = {}
            for s in servers:  # warm-up: one of each
                for accept, encoding in WAYS.values():
                    s.scrape(accept, encoding)
            for t in range(args.trials):
                order = servers if t % 2 == 0 else servers[::-1]
                for way, (accept, encoding) in WAYS.items():
                    for s in order:
                        took, body, _ = s.scrape(accept, encoding)
                        times.setdefault((s.name, way), []).append(took)
                        sizes[(s.name, way)] = len(body)
            daemon_series = counts["esper-telemetryd"]
            for way in WAYS:
                med = {s.name: statistics.median(times[(s.name, way)]) * 1e3 for s in servers}
                ours = med["esper-telemetryd"]
                cells = [
                    f"{daemon_series:,}",
                    way,
                    f"{ours:.1f}",
                    f"{sizes[('esper-telemetryd', way)] / 1e6:.2f}",
                ]
                if args.baseline:
                    before = med["esper-telemetryd before"]
                    cells += [f"{before:.1f}", f"{before / ours:.2f}x"]
                peer = med["prometheus_client"]
                cells += [f"{peer:.1f}", f"{peer / ours:.2f}x"]
                rows.append("| " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
                notes.append(
                    f"{daemon_series:,} series, {way}: esper-telemetryd "
                    + ", ".join(f"{x * 1e3:.1f}" for x in times[("esper-telemetryd", way)])
                    + " ms"
                )
        finally:
            for s in servers:
                s.close()

    head = ["series", "way", "esper-telemetryd (ms)", "sent (MB)"]
    if args.baseline:
        head += ["before (ms)", "before / now"]
    head += ["prometheus_client (ms)", "prometheus_client / esper-telemetryd"]
    section = "\n".join(
        [
            SECTION,
            "",
            f"`python bench/scrape.py --trials {args.trials}` ({time.strftime('%Y-%m-%d')}). "
            f"Machine: {_machine()}.",
            f"One daemon process (`--web.max-series` raised past the sizes) and, on the same "
            f"machine, prometheus_client's `start_http_server` serving the same runs (the same "
            f"events applied to the same aggregator, a fresh snapshot per scrape). Runs of "
            f"{GROUPS} groups. Each trial scrapes every server once in each way, interleaved, "
            f"the order alternating; a scrape is timed from the request to the last byte of the "
            f"body on a kept-alive connection; medians of {args.trials} trials. `prometheus` is "
            f"what Prometheus 2.42 asks (`Accept: {PROMETHEUS_ACCEPT}`, gzip); the daemon answers "
            f"it in OpenMetrics, as asked.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---:" if i != 1 else "---" for i in range(len(head))) + "|",
            *rows,
            "",
            "Every trial (ms): " + "; ".join(notes) + ".",
            "",
        ]
    )
    print()
    print(section)
    if args.write:
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
