"""The Prometheus files under deploy/: promtool checks, unit tests, and names the daemon exports."""

from __future__ import annotations

import re
import subprocess

import pytest
from deploy_support import (
    DEPLOY,
    PROMETHEUS_SERIES,
    RULE_TESTS,
    RULES,
    load_yaml,
    promql_metric_names,
    recorded_names,
    rule_exprs,
    tool,
)

# Inputs the rules document as optional, user-written recording rules (per-run bands).
OPTIONAL_INPUTS = {"esper:seed_grad_ratio_min:override", "esper:seed_grad_ratio_max:override"}

# The alerts the deployment promises (issue 5), by what they watch.
REQUIRED_ALERTS = {
    "EsperIsolationViolation": "esper_isolation_violations_total",
    "EsperNonFiniteGradients": "esper_grad_nonfinite_total",
    "EsperDeviceMismatch": "esper_device_mismatch_total",
    "EsperGroupStale": "esper_group_stale",
    "EsperGroupInconsistent": "esper_group_inconsistent",
    "EsperCollectorDroppingEvents": "esper_collector_dropped_events_total",
    "EsperCapturesStalled": "esper_last_capture_timestamp_seconds",
    "EsperSeedGradRatioOutOfBand": "esper_seed_grad_ratio",
    "EsperDaemonRejectingMessages": "esper_daemon_rejected_total",
    "EsperDaemonOverflow": "esper_daemon_overflow_total",
    "EsperMessagesLost": "esper_messages_lost_total",
    "EsperDaemonFileDescriptorsNearLimit": "process_open_fds",
    "EsperDaemonScrapeTruncated": "esper_daemon_scrape_omitted_series",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("promtool"), *args], cwd=DEPLOY.parent, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("config", ["prometheus/prometheus.yml", "docker/prometheus.yml"])
def test_promtool_check_config(config: str) -> None:
    result = promtool("check", "config", str(DEPLOY / config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file syntax" in result.stdout


def test_host_config_loads_the_rules() -> None:
    # check config also checks the rule files it names: they must be found and counted.
    result = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    n_rules = sum(len(g["rules"]) for g in load_yaml(RULES)["groups"])
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    assert f"SUCCESS: {n_rules} rules found" in result.stdout, result.stdout


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout, result.stdout


def test_promtool_test_rules_can_fail(tmp_path) -> None:
    # The unit tests must bite: the same tests against rules with the isolation alert
    # inverted fail.
    broken = RULES.read_text().replace("(esper_isolation_ok == 0)", "(esper_isolation_ok == 1)")
    assert broken != RULES.read_text()
    rules_dir = tmp_path / "rules"
    tests_dir = tmp_path / "tests"
    rules_dir.mkdir()
    tests_dir.mkdir()
    (rules_dir / RULES.name).write_text(broken)
    (tests_dir / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = promtool("test", "rules", str(tests_dir / RULE_TESTS.name))
    assert result.returncode != 0
    assert "EsperIsolationViolation" in result.stdout + result.stderr


def test_required_alerts_exist_and_watch_their_metric() -> None:
    alerts = {r["alert"]: r for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r}
    missing = set(REQUIRED_ALERTS) - set(alerts)
    assert not missing, f"alerts missing: {sorted(missing)}"
    for name, metric in REQUIRED_ALERTS.items():
        assert metric in promql_metric_names(alerts[name]["expr"]), (name, alerts[name]["expr"])
    # Stalled captures only count while collectors are attached (before goodbye).
    assert "esper_collectors" in promql_metric_names(alerts["EsperCapturesStalled"]["expr"])


def test_every_alert_is_labelled_and_explained() -> None:
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            assert rule["annotations"]["description"].strip(), rule["alert"]
            # No alert keyed on a label Prometheus owns being set by the daemon.
            assert "exported_job" not in rule["expr"] and "exported_instance" not in rule["expr"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    alerts = {r["alert"] for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r}
    fires, quiet = set(), set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fires == set(), f"alerts never tested firing: {sorted(alerts - fires)}"
    assert alerts - quiet == set(), f"alerts never tested quiet: {sorted(alerts - quiet)}"


def test_seed_ratio_band_is_configurable_in_one_place() -> None:
    rules = load_yaml(RULES)
    band = {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    assert re.fullmatch(
        r"vector\(\s*[0-9.eE+-]+\s*\)\s*", band["esper:seed_grad_ratio_min:default"]
    )
    assert re.fullmatch(
        r"vector\(\s*[0-9.eE+-]+\s*\)\s*", band["esper:seed_grad_ratio_max:default"]
    )
    # The band is evaluated in the same group as the alert, before it.
    group = next(
        g
        for g in rules["groups"]
        if any(r.get("alert") == "EsperSeedGradRatioOutOfBand" for r in g["rules"])
    )
    order = [r.get("record") or r.get("alert") for r in group["rules"]]
    assert order.index("esper:seed_grad_ratio_min") < order.index("EsperSeedGradRatioOutOfBand")
    assert order.index("esper:seed_grad_ratio_max") < order.index("EsperSeedGradRatioOutOfBand")


def test_rules_name_only_metrics_the_daemon_exports(exposition) -> None:
    rules = load_yaml(RULES)
    known = exposition["names"] | recorded_names(rules) | PROMETHEUS_SERIES | OPTIONAL_INPUTS
    used = set().union(*(promql_metric_names(e) for e in rule_exprs(rules)))
    assert used, "no metric names found in the rules"
    assert used - known == set(), (
        f"rules use metrics the daemon does not export: {sorted(used - known)}"
    )


def test_scrape_configs_use_the_job_name_the_rules_expect() -> None:
    for config in ("prometheus/prometheus.yml", "docker/prometheus.yml"):
        jobs = [j["job_name"] for j in load_yaml(DEPLOY / config)["scrape_configs"]]
        assert "esper-telemetryd" in jobs, config
    expr = next(
        r["expr"]
        for g in load_yaml(RULES)["groups"]
        for r in g["rules"]
        if r.get("alert") == "EsperTelemetryDaemonDown"
    )
    assert 'job="esper-telemetryd"' in expr
    host = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"][0]
    assert host["static_configs"][0]["targets"] == ["127.0.0.1:9469"]  # the daemon's default
