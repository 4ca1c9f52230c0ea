"""Helpers for the deploy tests: paths, external tools, a real daemon, PromQL names.

A tool these tests need (promtool, prometheus, PyYAML) that is missing makes the test
fail under CI (env ``CI`` set) and skip elsewhere: in CI a silent skip would let broken
deployment files through.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from daemon_support import get, parse

from esper_telemetry.commands.daemon_process import (
    DaemonProcess,
    DaemonStartError,
    console_script,
    http_get,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "esper-telemetry.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "esper-telemetry.test.yml"
DASHBOARD = DEPLOY / "grafana" / "esper-telemetry.json"


def need(what: str, found: bool, hint: str = "") -> None:
    """Fail under CI, skip elsewhere, when a required tool is missing."""
    if found:
        return
    message = f"{what} is missing{': ' + hint if hint else ''}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: deploy tests must not skip)")
    pytest.skip(message)


def tool(name: str) -> str:
    """Path of an executable from Debian's prometheus package (promtool, prometheus)."""
    path = shutil.which(name)
    need(
        name,
        path is not None,
        "run `bash tools/ensure-prometheus.sh` (Debian's prometheus package)",
    )
    return path  # type: ignore[return-value]


def load_yaml(path: Path) -> object:
    try:
        import yaml
    except ImportError:
        need("PyYAML", False, "pip install pyyaml (a dev dependency)")
        raise
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[object]:
    try:
        import yaml
    except ImportError:
        need("PyYAML", False, "pip install pyyaml (a dev dependency)")
        raise
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_command() -> list[str]:
    """The daemon's console script from this interpreter's environment (``python -m
    esper_telemetry.daemon`` when it is not installed as a script)."""
    return console_script("esper-telemetryd", "esper_telemetry.daemon")


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, wait, then SIGKILL: every process a test starts ends here."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Daemon(DaemonProcess):
    """A running ``esper-telemetryd`` (debug log) on loopback ports the kernel picks; ``address``
    is its web ``host:port``, what a scrape config's target takes."""

    def __init__(self, tmp: Path, extra: Sequence[str] = ()) -> None:
        super().__init__(
            "--log.level=debug", *extra, log_path=tmp / "esper-telemetryd.log", cwd=ROOT
        )
        self.address = self.web.removeprefix("http://")
        self.web_port = int(self.address.rsplit(":", 1)[1])
        try:
            self.wait_ready()
        except DaemonStartError as exc:
            self.stop()
            pytest.fail(str(exc))

    def metrics(self) -> str:
        status, body = http_get(self.url)
        assert status == 200, f"/metrics answered {status}"
        return body

    def close(self) -> int | None:
        return self.stop()


def exposition_names(text: str) -> set[str]:
    """Metric names in a text exposition: families (a counter's with ``_total``) and samples."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names.update(s.name for s in family.samples)
    return names


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample ``name{labels}`` in an exposition, or None."""
    return get(parse(text), name, **labels)


def send_events(endpoint: str, events: Sequence[object], raw: Sequence[bytes] = ()) -> None:
    """Encode and PUSH events (and raw frames) to the daemon, bounded by a linger."""
    import zmq

    import esper_telemetry as et

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    try:
        sock.connect(endpoint)
        for frame in raw:
            sock.send(frame)
        sock.send(et.encode(list(events)))
    finally:
        sock.close()
        ctx.term()


def sample_events(run: str) -> list[object]:
    """One run's worth of every event kind, so every per-run family has samples."""
    import esper_telemetry as et

    now = time.time()
    groups = (
        et.GroupDecl("host", "host", 1000, False),
        et.GroupDecl("seed", "seed", 100, False),
        et.GroupDecl("frozen", "group", 50, True),
    )
    return [
        et.Hello(run, 0, now, 1, "test-host", os.getpid(), "0.1.0", "none", groups),
        et.Norms(
            run,
            0,
            now,
            7,
            False,
            (
                et.GroupNorm("host", "host", 1000, 4.0, 0, False, False),
                et.GroupNorm("seed", "seed", 100, 0.25, 1, False, False),
                et.GroupNorm("frozen", "group", 50, None, 0, False, True),
            ),
        ),
        et.IsolationViolation(run, 0, now, 7, "frozen", "gradient", "test leak", 0.5),
        et.DeviceMismatch(run, 0, now, "split", "host", ("cpu", "cuda:0")),
        et.Heartbeat(run, 0, now, 10, 2, 0, 0),
    ]


# --- PromQL -----------------------------------------------------------------------------

# Series Prometheus makes itself for every target, not the daemon: dashboards and rules
# may use them.
PROMETHEUS_SERIES = frozenset({"up"})

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:([a-zA-Z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,\s*)?(\w+)\s*\)\s*$"
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords or label names).

    Enough of PromQL for the rules and dashboards here: strings, label matchers, ranges
    and the label lists of by/without/on/ignoring/group_* are removed first; of what is
    left, an identifier followed by "(" is a function or aggregation.
    """
    m = _LABEL_VALUES.match(expr)  # Grafana's label_values(metric, label)
    if m:
        return {m.group(1)} if m.group(1) else set()
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub(" ", s)
    s = _RANGE.sub(" ", s)
    s = _CLAUSE.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        name = m.group(0)
        rest = s[m.end() :].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${run}": ".+",
    "$run": ".+",
    "${group}": ".+",
    "$group": ".+",
    "${job}": "esper-telemetryd",
    "$job": "esper-telemetryd",
}


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by plain values."""
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def promtool_check_exprs(exprs: Iterable[str], tmp: Path) -> None:
    """Parse every expression with promtool (as recording rules): a syntax error fails."""
    exprs = list(exprs)
    rules = {
        "groups": [
            {
                "name": "check",
                "rules": [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp / "exprs.rules.json"  # JSON is YAML
    path.write_text(json.dumps(rules))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout, result.stdout


def recorded_names(rules: dict) -> set[str]:
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def rule_exprs(rules: dict) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


class Prometheus:
    """The Prometheus server binary on a free port, scraping one target and evaluating the
    project's rules every ``interval`` (a Prometheus duration; the scrape timeout is 1 s)."""

    def __init__(self, tmp: Path, target: str, interval: str = "1s") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        # JSON is YAML: no YAML writer needed.
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": interval,
                        "scrape_timeout": "1s",
                        "evaluation_interval": interval,
                    },
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "esper-telemetryd", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.console.templates=/nonexistent",
                "--web.console.libraries=/nonexistent",
                "--log.level=warn",
            ],
            cwd=tmp,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._ready, 30, "Prometheus /-/ready")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        return http_get(f"{self.url}/-/ready", 0.5)[0] == 200

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url, 5)
        assert status == 200, f"{url}: {status} {body[:500]}"
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that selects one series, or None when it selects none."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} selects {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def alerts(self, name: str, **labels: str) -> list[dict]:
        return [
            a
            for a in self.api("alerts")["alerts"]
            if a["labels"].get("alertname") == name
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        stop(self.proc)
        self._log.close()
