"""``esper-telemetry top`` without a terminal: its parser against the daemon's real renderer,
rows sorted worst first, one-line errors for a daemon that is down or answers garbage, and a
CLI that starts without torch.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator

import pytest

pytest.importorskip("prometheus_client")
from daemon_support import exposition as daemon_text  # noqa: E402
from daemon_support import gn, goodbye, heartbeat, hello, make_limits, norms  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from esper_telemetry import DeviceMismatch, GroupNorm, IsolationViolation, Norms  # noqa: E402
from esper_telemetry.commands import top  # noqa: E402
from esper_telemetry.daemon.aggregator import Aggregator  # noqa: E402
from esper_telemetry.daemon.stats import DaemonStats  # noqa: E402

NOW = 1_700_000_000.0
# The daemon's monotonic clock at NOW: captures are dated by when the daemon applied them.
MONO = 100_000.0
WEIRD = 'exp "7"\\ with\nnewline'


def exposition() -> str:
    """What a daemon holding four runs renders: healthy, violated, non-finite, a stale group."""
    agg = Aggregator(make_limits(ttl_s=86_400.0), DaemonStats(), logging.getLogger("test.top"))
    decls = (
        ("host", "host", 400, False),
        ("seed", "seed", 100, False),
        ("frozen", "group", 50, True),
    )
    for run in ("calm", "leaky", WEIRD, "gone"):
        agg.apply_batch([hello(run=run, decls=decls)], MONO - 8000)
    agg.apply_batch(
        [
            norms(
                "calm",
                step=9,
                groups=[
                    gn("host", 16.0, "host", 400),
                    gn("seed", 1.0, "seed", 100),
                    gn("frozen", None, "group", 50, isolated=True),
                ],
                time_=NOW - 3,
            )
        ],
        MONO - 3,
    )
    agg.apply_batch(
        [
            norms(
                "leaky",
                step=4,
                groups=[
                    gn("host", 4.0, "host", 400),
                    gn("seed", 1.0, "seed", 100),
                    gn("frozen", 0.25, "group", 50, isolated=True),
                ],
                time_=NOW - 75,
            ),
            IsolationViolation("leaky", 0, NOW, 4, "frozen", "gradient", "leak", 0.5),
            DeviceMismatch("leaky", 0, NOW, "split", "host", ("cpu", "cuda:0")),
            heartbeat("leaky", dropped=5),
        ],
        MONO - 75,
    )
    for step in (1, 2):
        agg.apply_batch(
            [
                norms(
                    WEIRD,
                    step=step,
                    groups=[
                        gn("host", 1.0, "host", 400),
                        gn("seed", float("nan"), "seed", 100, nonfinite=2),
                        gn("frozen", None, "group", 50, isolated=True),
                    ],
                    time_=NOW - 7200,
                )
            ],
            MONO - 7200,
        )
    agg.apply_batch(
        [
            norms(
                "gone",
                step=3,
                groups=[
                    gn("host", 1.0, "host", 400),
                    gn("seed", 1.0, "seed", 100),
                    gn("frozen", None, "group", 50, isolated=True),
                ],
                time_=NOW - 1,
            ),
            DeviceMismatch("gone", 0, NOW, "stale", "seed", ()),
        ],
        MONO - 1,
    )
    agg.tick(MONO, NOW)
    return daemon_text(agg, process_metrics=True)


def test_the_parser_reads_what_the_daemon_renders_as_prometheus_client_does():
    text = exposition()
    ours = top.parse_exposition(text)
    theirs = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("esper_"):
                theirs.setdefault(s.name, []).append((s.labels, s.value))
    assert sorted(ours) == sorted(theirs)
    for name, series in theirs.items():
        key = lambda lv: json.dumps(lv[0], sort_keys=True)  # noqa: E731
        got, want = sorted(ours[name], key=key), sorted(series, key=key)
        assert [g[0] for g in got] == [w[0] for w in want], name
        assert all(g[1] == w[1] or (g[1] != g[1] and w[1] != w[1]) for g, w in zip(got, want)), name
    assert any(labels.get("run") == WEIRD for labels, _ in ours["esper_grad_norm"])


def test_rows_put_violations_then_nonfinite_on_top_with_every_column():
    rows = top.build_rows(top.parse_exposition(exposition()))
    assert [(r.run, r.group) for r in rows][:3] == [
        ("leaky", "frozen"),
        (WEIRD, "seed"),
        ("gone", "seed"),
    ]
    assert all(not r.unhealthy for r in rows[3:]) and len(rows) == 12
    table = dict(((r.run, r.group), top.cells(r, NOW)) for r in rows)
    #   RUN GROUP STEP NORM RATIO MAX SPIKES NONFINITE ISOLATION DEVICE DROPS AGE (TREND)
    assert table[("leaky", "frozen")][2:-1] == (
        "4",
        "0.5",
        "-",
        "0.5",  # one capture: the window's largest norm is the latest
        "0",
        "0",
        "VIOLATED(1)",
        "1",
        "5",
        "1m15s",
    )
    assert table[("leaky", "seed")][2:-1] == ("4", "1", "1", "1", "0", "0", "ok", "1", "5", "1m15s")
    assert (
        table[("leaky", "host")][8] == "-"
    )  # the daemon tracks isolation for isolated groups and seeds
    # One non-finite capture per step; the seed's NaN makes its ratio NaN too.
    # No finite norm in the window: no MAX.
    assert table[(WEIRD, "seed")][2:-1] == (
        "2",
        "nan",
        "nan",
        "-",
        "0",
        "2",
        "ok",
        "0",
        "0",
        "2h00m",
    )
    assert table[("calm", "frozen")][2:-1] == (
        "9",
        "no-grad",
        "-",
        "-",
        "0",
        "0",
        "ok",
        "0",
        "0",
        "3.0s",
    )
    assert all(cells[-1] == "-" for cells in table.values())  # no history read: no sparkline
    assert table[("calm", "seed")][4] == "0.5"  # (1 / 4) * sqrt(400 / 100)
    assert table[("gone", "seed")][2:5] == ("3", "stale", "-")  # no longer followed: no numbers
    lines = top.format_table(rows, NOW)
    assert lines[0][1] == "header" and lines[0][0].split() == list(top.HEADER)
    assert [style for _, style in lines[1:5]] == ["violation", "warning", "warning", None]


def test_a_run_whose_ranks_all_said_goodbye_reads_ended_with_its_final_values():
    agg = Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.top"))
    agg.apply_batch([hello(run="short"), hello(run="long")], MONO - 20)
    for run in ("short", "long"):
        agg.apply_batch(
            [norms(run, step=7, groups=[gn("host", 9.0, "host", 400)], time_=NOW - 12)], MONO - 12
        )
    agg.apply_batch([goodbye(run="short")], MONO - 11)
    agg.tick(MONO, NOW)
    rows = {
        (r.run, r.group): r
        for r in top.build_rows(top.parse_exposition(daemon_text(agg, process_metrics=False)))
    }
    assert rows[("short", "host")].ended and not rows[("long", "host")].ended
    assert top.cells(rows[("short", "host")], NOW)[2:4] == ("7", "3")  # the final values stay
    assert top.cells(rows[("short", "host")], NOW)[-2] == "ended(12s)"
    assert top.cells(rows[("long", "host")], NOW)[-2] == "12s"


def test_a_group_its_ranks_contradict_reads_inconsistent_and_is_marked():
    # Two ranks hold the same head (one fingerprint) and report other values for step 5:
    # the daemon withholds the norm and flags the group; the host agrees and stays a number.
    agg = Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.top"))
    for rank, head_sq in ((0, 4.0), (1, 9.0)):
        groups = (
            GroupNorm("host", "host", 400, 16.0, 0, True, False, 7),
            GroupNorm("head", "group", 10, head_sq, 0, True, False, 8),
        )
        agg.apply_batch([Norms("pp", rank, NOW - 2, 5, False, groups, 2, 0)], MONO - 2)
    agg.tick(MONO, NOW)
    rows = top.build_rows(top.parse_exposition(daemon_text(agg, process_metrics=False)))
    by = {(r.run, r.group): r for r in rows}
    assert by[("pp", "head")].inconsistent and not by[("pp", "host")].inconsistent
    assert top.cells(by[("pp", "head")], NOW)[2:5] == ("5", "inconsistent", "-")
    assert top.cells(by[("pp", "host")], NOW)[3] == "4"
    assert [(r.run, r.group) for r in rows] == [("pp", "head"), ("pp", "host")]
    assert [style for _, style in top.format_table(rows, NOW)[1:]] == ["warning", None]


def test_run_filter_takes_a_name_or_a_pattern():
    samples = top.parse_exposition(exposition())
    assert {r.run for r in top.build_rows(samples, "calm")} == {"calm"}
    assert {r.run for r in top.build_rows(samples, "exp*")} == {WEIRD}
    assert top.build_rows(samples, "nothing") == []


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>Not here</body></html>",
        '{"error": "nope"}',
        'esper_grad_norm{run="a" 1',
        "esper_grad_norm one",
        "\x00\x01",
    ],
)
def test_garbage_is_refused_by_the_parser(body):
    with pytest.raises(top.ExpositionError):
        top.parse_exposition(body)


class Server:
    """A stdlib HTTP server on a random loopback port answering ``status`` and ``body``."""

    def __init__(self, status: int, body: bytes) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(outer.status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args) -> None:
                pass

        self.status, self.body = status, body
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(200, b"")
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Any attempt to import torch is recorded and fails, caught or not; the last stderr line says
# whether one was made.
_NO_TORCH = """
import sys
attempts = []

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            attempts.append(name)
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, NoTorch())
try:
    from esper_telemetry.commands.cli import main
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
finally:
    print("TORCH " + ",".join(attempts) if attempts else "NO-TORCH", file=sys.stderr)
sys.exit(rc)
"""


def run_cli(*args: str) -> tuple[int, str, str]:
    """``esper-telemetry ARGS`` in a fresh interpreter where importing torch fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "status,body,says",
    [
        (200, b"<html><body>Grafana</body></html>", "did not answer a metrics exposition (line 1"),
        (200, b"\xff\xfe garbage", "not UTF-8"),
        (404, b"nope", "answered HTTP 404"),
        (200, b"# HELP up x\n# TYPE up gauge\nup 1\n", "without esper_daemon_build_info"),
    ],
)
def test_once_says_in_one_line_what_is_wrong_with_the_answer(server, status, body, says):
    server.status, server.body = status, body
    rc, out, err = run_cli("top", "--once", "--url", server.url)
    lines = err.splitlines()
    assert rc == 1 and out == "", err
    assert len(lines) == 2 and lines[1] == "NO-TORCH", err
    assert lines[0].startswith("esper-telemetry top: ") and says in lines[0], lines[0]
    assert server.url in lines[0]


def test_once_against_a_daemon_that_is_down_says_so_in_one_line():
    url = f"http://127.0.0.1:{closed_port()}/metrics"
    rc, out, err = run_cli("top", "--once", "--url", url)
    assert rc == 1 and out == ""
    assert err.splitlines() == [
        f"esper-telemetry top: cannot reach {url}: Connection refused",
        "NO-TORCH",
    ]


def test_once_prints_the_table_without_importing_torch(server):
    server.body = exposition().encode()
    rc, out, err = run_cli("top", "--once", "--url", server.url, "--run", "leaky")
    assert rc == 0 and err.splitlines() == ["NO-TORCH"], err
    lines = out.splitlines()
    assert (
        lines[0].startswith(f"{server.url}  esper-telemetryd ")
        and "runs=1 groups=3 violated=1" in lines[0]
    )
    assert lines[1].split() == list(top.HEADER)
    assert [ln.split()[:2] for ln in lines[2:]] == [
        ["leaky", "frozen"],
        ["leaky", "host"],
        ["leaky", "seed"],
    ]


def test_help_and_a_usage_error_start_without_torch():
    rc, out, err = run_cli("--help")
    assert rc == 0 and "top" in out and "demo" in out and err.splitlines() == ["NO-TORCH"]
    rc, out, err = run_cli("top", "--help")
    assert rc == 0 and "--once" in out and "http://127.0.0.1:9469/metrics" in out
    rc, _, err = run_cli("top", "--once", "--interval", "0")
    assert rc == 2 and "--interval must be" in err and err.splitlines()[-1] == "NO-TORCH"


def test_the_probe_sees_an_attempt_to_import_torch():
    # Otherwise the NO-TORCH lines above would pass for a CLI that tries torch and hides the error.
    _, _, err = run_cli("demo", "--steps", "1")
    assert "TORCH torch" in err.splitlines(), err


def test_the_live_view_without_a_terminal_points_to_once():
    rc, out, err = run_cli("top", "--url", "http://127.0.0.1:1/metrics")
    assert rc == 2 and out == ""
    assert err.splitlines() == [
        "esper-telemetry top: not a terminal; use --once to print one table",
        "NO-TORCH",
    ]


# -- sparklines ------------------------------------------------------------------------------------
def test_a_sparkline_spans_the_blocks_on_a_log_scale_and_keeps_a_spike():
    # One point per character: 1, 10, ..., 1e7 climbs one block per decade.
    assert top.sparkline([(s, 10.0**s) for s in range(8)]) == "▁▂▃▄▅▆▇█"
    # 256 steps in 16 characters: a one-step spike survives (each character is its max).
    points = [(s, 1.0) for s in range(256)]
    points[77] = (77, 1000.0)
    line = top.sparkline(points)
    assert len(line) == 16 and line[77 // 16] == "█" and set(line) - {"█"} == {"▁"}
    # A non-finite step marks its character; steps without gradient only read as such.
    assert top.sparkline([(0, 1.0), (1, None), (2, 5.0)], nonfinite=[2]) == "▄·!"
    assert top.sparkline([(0, 0.0), (1, 2.0), (2, 4.0)]) == "▁▁█"
    assert top.sparkline([(0, 3.0), (1, 3.0)]) == "▄▄" and top.sparkline([]) == "-"


def test_the_history_api_is_looked_for_next_to_the_metrics_then_at_the_root():
    assert top.api_bases("http://h:9464/metrics") == ["http://h:9464/api/v1/"]
    assert top.api_bases("https://h/esper/metrics") == [
        "https://h/esper/api/v1/",
        "https://h/api/v1/",
    ]


class Routed:
    """A stdlib HTTP server answering (status, body) by path, on a random loopback port."""

    def __init__(self, routes: dict[str, tuple[int, bytes]]) -> None:
        self.routes, self.asked = routes, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.asked.append(self.path)
                status, body = outer.routes.get(self.path.split("?")[0], (404, b"not found\n"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _history(run: str, groups: dict[str, list]) -> bytes:
    return json.dumps(
        {
            "run": run,
            "groups": [{"name": g, "points": p, "nonfinite": []} for g, p in groups.items()],
        }
    ).encode()


def test_once_shows_a_sparkline_per_group_and_a_dash_where_the_history_fails():
    text = exposition().encode()
    weird = "/api/v1/runs/" + urllib.parse.quote(WEIRD, safe="") + "/history"
    s = Routed(
        {
            "/metrics": (200, text),
            "/api/v1/runs/calm/history": (
                200,
                _history("calm", {"host": [[0, 1.0], [1, 10.0]], "seed": [[0, 2.0], [1, 2.0]]}),
            ),
            "/api/v1/runs/leaky/history": (500, b"oops"),
            weird: (200, b"not json"),
        }
    )
    try:
        rc, out, err = run_cli("top", "--once", "--url", s.base + "/metrics")
    finally:
        s.close()
    assert rc == 0 and err.splitlines() == ["NO-TORCH"], err
    rows = {tuple(ln.split()[:2]): ln.split()[-1] for ln in out.splitlines()[2:] if ln.strip()}
    assert rows[("calm", "host")] == "▁█" and rows[("calm", "seed")] == "▄▄"
    assert rows[("calm", "frozen")] == "-"  # not in the history: no sparkline
    assert rows[("leaky", "host")] == "-" and rows[("gone", "seed")] == "-"
    # One request per run shown, each asking for the latest steps only.
    histories = [p for p in s.asked if "/history" in p]
    assert len(histories) == 4 and all(p.endswith(f"?last={top.SPARK_STEPS}") for p in histories)
