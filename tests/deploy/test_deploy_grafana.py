"""The Grafana dashboard: valid JSON, valid PromQL, and only metrics the daemon exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

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
    "esper_grad_norm",
    "esper_seed_grad_ratio",
    "esper_isolation_ok",
    "esper_isolation_violations_total",
    "esper_grad_nonfinite_total",
    "esper_device_mismatch_total",
    "esper_collector_dropped_events_total",
    "esper_daemon_events_total",
    "esper_daemon_rejected_total",
    "esper_daemon_overflow_total",
    "esper_daemon_runs",
    "esper_last_capture_timestamp_seconds",
    "esper_collectors",
    "esper_group_stale",
    "esper_group_last_step",
    "esper_run_ended",
    "esper_daemon_runs_evicted_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def panels(dash: dict) -> Iterator[dict]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows hold their panels


def expressions(dash: dict) -> list[tuple[str, str]]:
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
    exprs = [
        grafana_to_promql(e)
        for where, e in expressions(dashboard)
        if not where.startswith("variable")
    ]
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


# --- issue 13: the dashboard as a Grafana user expects ----------------------------------


def test_importing_asks_for_the_prometheus_data_source(dashboard) -> None:
    inputs = {i["name"]: i for i in dashboard.get("__inputs", [])}
    assert list(inputs) == ["DS_PROMETHEUS"]
    assert (inputs["DS_PROMETHEUS"]["type"], inputs["DS_PROMETHEUS"]["pluginId"]) == (
        "datasource",
        "prometheus",
    )
    text = json.dumps(dashboard)
    # Every ${DS_...} the import substitutes is declared, and the one input is used: the
    # data source variable starts on what the import dialog picked.
    assert set(re.findall(r"\$\{(DS_[A-Z_]+)\}", text)) == set(inputs)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    required = {(r["type"], r["id"]) for r in dashboard.get("__requires", [])}
    assert ("datasource", "prometheus") in required
    assert {("panel", p["type"]) for p in panels(dashboard) if p["type"] != "row"} <= required


def test_variables_for_data_source_run_group_and_no_hard_coded_job(dashboard) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "run", "group"} <= set(variables)
    group = variables["group"]
    assert group["multi"] and group["includeAll"]
    query = group["query"]["query"] if isinstance(group["query"], dict) else group["query"]
    assert "$run" in query, "the group list follows the selected runs"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", v["name"]
    for where, expr in expressions(dashboard):
        for m in re.finditer(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
            assert m.group(2) == "$job", f"{where} names a job: {expr}"
    if "job" in variables:  # the daemon's jobs are found, not assumed
        job = variables["job"]
        query = job["query"]["query"] if isinstance(job["query"], dict) else job["query"]
        assert promql_metric_names(query) == {"esper_daemon_build_info"}
        # "All" must mean the daemons' jobs, not every job Prometheus scrapes.
        assert job.get("allValue") in (None, "")


GROUP_METRICS = {
    "esper_grad_norm",
    "esper_group_has_gradient",
    "esper_group_stale",
    "esper_group_parameters",
    "esper_group_last_step",
    "esper_isolation_ok",
    "esper_isolation_violations_total",
    "esper_grad_nonfinite_total",
}


def test_per_group_panels_follow_the_group_variable(dashboard) -> None:
    seen = 0
    for where, expr in expressions(dashboard):
        if where.startswith("variable"):
            continue
        if promql_metric_names(expr) & GROUP_METRICS:
            assert 'group=~"$group"' in expr, f"{where}: {expr}"
            seen += 1
        if "esper_seed_grad_ratio" in promql_metric_names(expr):
            assert 'seed=~"$group"' in expr, f"{where}: {expr}"
    assert seen >= 8


def _panels_showing(dash: dict, metric: str) -> list[dict]:
    return [
        p
        for p in panels(dash)
        if any(metric in promql_metric_names(t["expr"]) for t in p.get("targets", []))
    ]


def test_the_ratio_panel_can_show_zero(dashboard) -> None:
    # 0 is what a starved seed reads (a host without gradient, or a seed with none): a log
    # axis cannot draw it, and a minimum above 0 would cut it off.
    (ratio,) = _panels_showing(dashboard, "esper_seed_grad_ratio")
    defaults = ratio["fieldConfig"]["defaults"]
    scale = defaults.get("custom", {}).get("scaleDistribution", {"type": "linear"})
    assert scale["type"] in ("linear", "symlog"), scale
    assert defaults.get("min", 0) <= 0
    for override in ratio["fieldConfig"].get("overrides", []):
        for prop in override["properties"]:
            if prop["id"] == "custom.scaleDistribution":
                assert prop["value"]["type"] != "log", override
            if prop["id"] == "min":
                assert prop["value"] <= 0, override


def test_a_panel_draws_norms_against_the_training_step(dashboard) -> None:
    (panel,) = [p for p in _panels_showing(dashboard, "esper_group_last_step")]
    assert panel["type"] == "xychart"
    targets = {t["refId"]: t for t in panel["targets"]}
    by_metric = {next(iter(promql_metric_names(t["expr"]))): t for t in targets.values()}
    step, norm = by_metric["esper_group_last_step"], by_metric["esper_grad_norm"]
    # Both reduced to exactly (run, group), so a step and a norm of one group and time meet
    # in one row when the two tables are merged.
    for t in (step, norm):
        assert re.match(
            r"^max by \(run, group\) \(esper_\w+\{run=~\"\$run\", group=~\"\$group\"\}\)$",
            t["expr"],
        ), t["expr"]
        assert t["format"] == "table"
    steps = {s["id"]: s["options"] for s in panel["transformations"]}
    order = [s["id"] for s in panel["transformations"]]
    assert order.index("merge") < order.index("organize") < order.index("partitionByValues")
    renamed = steps["organize"]["renameByName"]
    x_name, y_name = renamed[f"Value #{step['refId']}"], renamed[f"Value #{norm['refId']}"]
    assert sorted(steps["partitionByValues"]["fields"]) == ["group", "run"]
    options = panel["options"]
    assert options["mapping"] == "auto"
    (series,) = options["series"]
    assert series["x"]["field"]["matcher"] == {"id": "byName", "options": x_name}
    assert series["y"]["field"]["matcher"] == {"id": "byName", "options": y_name}
