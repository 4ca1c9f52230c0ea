"""The Grafana dashboard: valid JSON, valid PromQL, and only metrics the daemon exports."""

from __future__ import annotations

import json
from typing import Iterator, List, Tuple

import pytest

from deploy_support import (
    DASHBOARD,
    PROMETHEUS_SERIES,
    RULES,
    grafana_to_promql,
    load_yaml,
    promql_metric_names,
    promtool_check_exprs,
    recorded_names,
)

# What the dashboard must show (issue 5): per-run norms by group, seed ratios, isolation
# status, non-finite and device-mismatch rates, collector drops, daemon health.
REQUIRED_METRICS = {
    "esper_grad_norm", "esper_seed_grad_ratio", "esper_isolation_ok",
    "esper_isolation_violations_total", "esper_grad_nonfinite_total",
    "esper_device_mismatch_total", "esper_collector_dropped_events_total",
    "esper_daemon_events_total", "esper_daemon_rejected_total", "esper_daemon_overflow_total",
    "esper_daemon_runs", "esper_last_capture_timestamp_seconds", "esper_collectors",
    "esper_group_stale",
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def panels(dash: dict) -> Iterator[dict]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows hold their panels


def expressions(dash: dict) -> List[Tuple[str, str]]:
    """(where, expr) for every PromQL expression: panel targets, annotations, variables."""
    out = []
    for p in panels(dash):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for a in dash.get("annotations", {}).get("list", []):
        if "expr" in a:
            out.append((f"annotation {a['name']!r}", a["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']!r}", q))
    return out


def test_dashboard_is_well_formed(dashboard) -> None:
    assert dashboard["uid"] == "esper-telemetry"
    assert dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["multi"] and variables["run"]["includeAll"]
    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
        # Inside the 24-column grid.
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_per_run_panels_follow_the_run_variable(dashboard) -> None:
    for where, expr in expressions(dashboard):
        names = promql_metric_names(expr)
        per_run = {n for n in names if n.startswith("esper_") and not n.startswith("esper_daemon_")}
        if per_run and not where.startswith("variable"):
            assert 'run=~"$run"' in expr, f"{where}: {expr}"


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path) -> None:
    exprs = [grafana_to_promql(e) for where, e in expressions(dashboard)
             if not where.startswith("variable")]
    assert len(exprs) >= 20
    promtool_check_exprs(exprs, tmp_path)


def test_dashboard_names_only_metrics_the_daemon_exports(dashboard, exposition) -> None:
    known = exposition["names"] | recorded_names(load_yaml(RULES)) | PROMETHEUS_SERIES
    used = set()
    for where, expr in expressions(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"{where} uses metrics the daemon does not export: {sorted(unknown)}"
        used |= names
    missing = REQUIRED_METRICS - used
    assert not missing, f"dashboard does not show {sorted(missing)}"
