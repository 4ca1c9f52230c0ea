"""The Kubernetes manifests: hardening, probes, ports and selectors that agree."""

from __future__ import annotations

import shutil
import subprocess
from typing import Dict

import pytest

from esper_telemetry import defaults

from deploy_support import DEPLOY, RULES, load_yaml, load_yaml_all

K8S = DEPLOY / "kubernetes"
OPERATOR = K8S / "prometheus-operator"


def objects(directory) -> Dict[str, dict]:
    """kind -> object, over the resources a kustomization lists."""
    out = {}
    for name in load_yaml(directory / "kustomization.yaml")["resources"]:
        for doc in load_yaml_all(directory / name):
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def base() -> Dict[str, dict]:
    return objects(K8S)


def container(base) -> dict:
    (c,) = base["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_kustomization_resources_exist() -> None:
    for directory in (K8S, OPERATOR):
        for name in load_yaml(directory / "kustomization.yaml")["resources"]:
            assert (directory / name).is_file(), name


def test_deployment_is_hardened(base) -> None:
    pod = base["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container(base)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "limits" in container(base)["resources"]


def test_one_daemon_replaced_not_rolled(base) -> None:
    # All ranks of a run must reach the same daemon (shards are summed per step).
    spec = base["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"


def test_probes_and_ports(base) -> None:
    c = container(base)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"zmq": defaults.DEFAULT_ZMQ_PORT, "http-metrics": defaults.DEFAULT_WEB_PORT}
    assert c["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http-metrics"}
    env = {e["name"]: e["value"] for e in c["env"]}
    known = {v for k, v in vars(defaults).items() if k.startswith("ENV_")}
    assert set(env) <= known, set(env) - known
    assert env[defaults.ENV_WEB_LISTEN_ADDRESS] == f"0.0.0.0:{defaults.DEFAULT_WEB_PORT}"
    assert env[defaults.ENV_ZMQ_LISTEN_ADDRESS] == f"tcp://0.0.0.0:{defaults.DEFAULT_ZMQ_PORT}"
    # Drain deadline fits the grace period.
    grace = base["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > defaults.DEFAULT_SHUTDOWN_TIMEOUT_SECONDS + defaults.DEFAULT_SHUTDOWN_LINGER_SECONDS


def test_service_selects_the_pods_and_names_their_ports(base) -> None:
    svc = base["Service"]
    pod_labels = base["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert base["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    pod_ports = {p["name"] for p in container(base)["ports"]}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in pod_ports
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(defaults.DEFAULT_WEB_PORT)
    assert ann["prometheus.io/path"] == defaults.DEFAULT_WEB_TELEMETRY_PATH


def test_service_monitor_matches_the_service(base) -> None:
    ops = objects(OPERATOR)
    sm = ops["ServiceMonitor"]
    svc = base["Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == defaults.DEFAULT_WEB_TELEMETRY_PATH
    # The job label EsperTelemetryDaemonDown watches.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "esper-telemetryd"


def test_prometheus_rule_is_the_rules_file() -> None:
    rule = objects(OPERATOR)["PrometheusRule"]
    assert rule["spec"] == load_yaml(RULES), (
        "prometheusrule.yaml is out of date: run deploy/kubernetes/prometheus-operator/sync-rules.sh")


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the manifests were still parsed above)")
    for directory in (K8S, OPERATOR):
        result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "kind: " in result.stdout
