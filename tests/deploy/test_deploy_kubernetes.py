"""The Kubernetes manifests: hardening, probes, ports and selectors that agree."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
from deploy_support import DEPLOY, RULES, daemon_command, load_yaml, load_yaml_all, need

from esper_telemetry import defaults
from esper_telemetry.daemon.config import SETTINGS, Config

K8S = DEPLOY / "kubernetes"
OPERATOR = K8S / "prometheus-operator"


def objects(directory) -> dict[str, dict]:
    """kind -> object, over the resources a kustomization lists."""
    out = {}
    for name in load_yaml(directory / "kustomization.yaml")["resources"]:
        for doc in load_yaml_all(directory / name):
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def base() -> dict[str, dict]:
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
    known = {row.env for row in SETTINGS}  # the daemon's variables
    assert set(env) <= known, set(env) - known
    assert env["ESPER_WEB_LISTEN_ADDRESS"] == f"0.0.0.0:{defaults.DEFAULT_WEB_PORT}"
    assert env["ESPER_ZMQ_LISTEN_ADDRESS"] == f"tcp://0.0.0.0:{defaults.DEFAULT_ZMQ_PORT}"
    # Drain deadline fits the grace period.
    grace = base["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Config().shutdown_timeout_s + Config().shutdown_linger_s


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
        "prometheusrule.yaml is out of date: "
        "run deploy/kubernetes/prometheus-operator/sync-rules.sh"
    )


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the manifests were still parsed above)")
    for directory in (K8S, OPERATOR):
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "kind: " in result.stdout


# --- who may connect: the NetworkPolicy -----------------------------------------------------

COLLECTORS_LABEL = {"esper-telemetry/collectors": "true"}
PROMETHEUS_LABEL = {"esper-telemetry/prometheus": "true"}


def test_network_policy_admits_only_labelled_namespaces_on_their_port(base) -> None:
    policy = base["NetworkPolicy"]["spec"]
    pod_labels = base["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["podSelector"]["matchLabels"], "an empty selector would take every pod"
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy.get("egress") in ([], None), "the daemon opens no connection"
    container_ports = {p["name"]: p["containerPort"] for p in container(base)["ports"]}
    admitted = {}
    for rule in policy["ingress"]:
        # A rule without `from` (or with an empty peer) would admit everyone.
        (peer,) = rule["from"]
        assert set(peer) == {"namespaceSelector"}, peer
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP"
        labels = tuple(sorted(peer["namespaceSelector"]["matchLabels"].items()))
        admitted[labels] = container_ports[port["port"]]
    assert admitted == {
        tuple(COLLECTORS_LABEL.items()): defaults.DEFAULT_ZMQ_PORT,
        tuple(PROMETHEUS_LABEL.items()): defaults.DEFAULT_WEB_PORT,
    }


def test_namespace_labels_are_documented() -> None:
    docs = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    for label in (COLLECTORS_LABEL, PROMETHEUS_LABEL):
        ((key, value),) = label.items()
        assert f"{key}={value}" in docs, key


# --- the secure component, built with kustomize from keys made the documented way ----------

SECURE_ENV = (
    "ESPER_ZMQ_CURVE_SECRET_KEY_FILE",
    "ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR",
    "ESPER_WEB_CONFIG_FILE",
)


def _uncomment_components(kustomization: Path) -> None:
    text = kustomization.read_text()
    on = text.replace("# components:\n#   - secure\n", "components:\n  - secure\n")
    assert on != text, f"{kustomization}: no commented `components: [secure]` to turn on"
    kustomization.write_text(on)


def _kustomize(directory: Path) -> list[dict]:
    import yaml

    kubectl = shutil.which("kubectl")
    need("kubectl", kubectl is not None, "kubectl kustomize builds the overlays")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


class SecureBuild(NamedTuple):
    objects: list[dict]
    operator: list[dict]
    files: Path  # the copy of deploy/kubernetes holding the generated files


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> SecureBuild:
    from tls_support import bcrypt_hash, make_pki

    from esper_telemetry.certificates import write_key_pair

    tree = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, tree)
    comp = tree / "secure"
    for sub in ("curve", "web", "authorized-keys"):
        (comp / sub).mkdir()
    write_key_pair(comp / "curve", "daemon")
    write_key_pair(comp / "authorized-keys", "collector")
    pki = make_pki(tree.parent / "pki")
    shutil.copy(pki.server_cert, comp / "web" / "tls.crt")
    shutil.copy(pki.server_key, comp / "web" / "tls.key")
    example = (comp / "web-config.example.yml").read_text()
    placeholder = re.search(r"\$2y\$10\$REPLACE\S*", example).group(0)
    (comp / "web" / "web-config.yml").write_text(
        example.replace(placeholder, "'" + bcrypt_hash("s3cret") + "'")
    )
    _uncomment_components(tree / "kustomization.yaml")
    scrape = tree / "prometheus-operator" / "secure" / "scrape"
    scrape.mkdir()
    shutil.copy(pki.ca, scrape / "ca.crt")
    (scrape / "username").write_text("prometheus")
    (scrape / "password").write_text("s3cret")
    _uncomment_components(tree / "prometheus-operator" / "kustomization.yaml")
    return SecureBuild(_kustomize(tree), _kustomize(tree / "prometheus-operator"), tree)


def _one(objs: list[dict], kind: str, name_prefix: str = "") -> dict:
    (obj,) = [
        o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)
    ]
    return obj


def _mounted(build: SecureBuild) -> dict[str, tuple[dict, dict, dict]]:
    """mountPath -> (mount, volume, the Secret or ConfigMap it shows)."""
    pod = _one(build.objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (c,) = pod["containers"]
    out = {}
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        if "secret" in v:
            source = _one(build.objects, "Secret", v["secret"]["secretName"])
            assert source["metadata"]["name"] == v["secret"]["secretName"]
        else:
            source = _one(build.objects, "ConfigMap", v["configMap"]["name"])
        out[m["mountPath"]] = (m, v, source)
    return out


def load_yaml_text(data: bytes) -> dict:
    import yaml

    return yaml.safe_load(data)


def _data(source: dict, key: str) -> bytes:
    if source["kind"] == "Secret":
        return base64.b64decode(source["data"][key])
    return source["data"][key].encode()


def test_secure_mounts_are_read_only_and_private(secure) -> None:
    mounted = _mounted(secure)
    assert len(mounted) == 3
    pod = _one(secure.objects, "Deployment")["spec"]["template"]["spec"]
    for path, (mount, volume, source) in mounted.items():
        assert mount.get("readOnly") is True, path
        assert "subPath" not in mount, f"{path}: a subPath mount never sees updates"
        mode = (volume.get("secret") or volume.get("configMap"))["defaultMode"]
        assert mode & 0o222 == 0, f"{path}: writable mode {mode:o}"
        if source["kind"] == "Secret":
            # Root-owned files: only the pod's group (fsGroup) may read them.
            assert mode & 0o007 == 0 and mode & 0o040, f"{path}: mode {mode:o}"
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        else:
            assert source["kind"] == "ConfigMap" and all(k.endswith(".key") for k in source["data"])
    # The daemon's secret key is in a Secret, never in a ConfigMap.
    for cm in (o for o in secure.objects if o["kind"] == "ConfigMap"):
        assert not any(k.endswith("key_secret") or k.endswith("tls.key") for k in cm["data"])


def test_secure_env_points_into_the_mounts(secure) -> None:
    c = _one(secure.objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    mounted = _mounted(secure)
    comp = secure.files / "secure"
    key_dir, _, key_name = env["ESPER_ZMQ_CURVE_SECRET_KEY_FILE"].rpartition("/")
    assert (
        _data(mounted[key_dir][2], key_name) == (comp / "curve" / "daemon.key_secret").read_bytes()
    )
    keys = mounted[env["ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR"]][2]
    assert keys["kind"] == "ConfigMap"
    assert _data(keys, "collector.key") == (comp / "authorized-keys" / "collector.key").read_bytes()
    web_dir, _, web_name = env["ESPER_WEB_CONFIG_FILE"].rpartition("/")
    web = load_yaml_text(_data(mounted[web_dir][2], web_name))
    # Paths in the web config are relative to its folder: the same Secret holds them.
    for name in (web["tls_server_config"]["cert_file"], web["tls_server_config"]["key_file"]):
        assert "/" not in name and _data(mounted[web_dir][2], name)


def test_secure_mounts_make_a_configuration_the_daemon_accepts(secure, tmp_path) -> None:
    """Lay the Secrets and the ConfigMap out as the kubelet would, under a temporary root,
    and run the daemon's --check-config with the pod's environment."""
    c = _one(secure.objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    root = tmp_path / "pod"
    for path, (_m, _v, source) in _mounted(secure).items():
        folder = root / path.lstrip("/")
        folder.mkdir(parents=True)
        for key in source["data"]:
            (folder / key).write_bytes(_data(source, key))
    env = {"PATH": "/usr/bin:/bin"}
    for e in c["env"]:
        value = e["value"]
        env[e["name"]] = str(root / value.lstrip("/")) if e["name"] in SECURE_ENV else value
    result = subprocess.run(
        [*daemon_command(), "--check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    # The check reads the mounted files: a web config naming a file the Secret lacks fails.
    web = Path(env["ESPER_WEB_CONFIG_FILE"])
    web.write_text(web.read_text().replace("cert_file: tls.crt", "cert_file: server.crt"))
    result = subprocess.run(
        [*daemon_command(), "--check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "server.crt" in result.stderr, result.stderr


def test_secure_probes_speak_https(secure) -> None:
    c = _one(secure.objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for probe, path in (
        ("startupProbe", "/-/ready"),
        ("livenessProbe", "/-/healthy"),
        ("readinessProbe", "/-/ready"),
    ):
        assert c[probe]["httpGet"] == {"path": path, "port": "http-metrics", "scheme": "HTTPS"}
    svc = _one(secure.objects, "Service")
    assert svc["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    # The rest of the base is still there, NetworkPolicy included.
    assert {o["kind"] for o in secure.objects} >= {
        "ServiceAccount",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "Secret",
        "ConfigMap",
    }


def test_secure_service_monitor_scrapes_with_tls_and_basic_auth(secure) -> None:
    sm = _one(secure.operator, "ServiceMonitor")
    secret = _one(secure.operator, "Secret")
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["port"] == "http-metrics"
    assert endpoint["path"] == defaults.DEFAULT_WEB_TELEMETRY_PATH
    refs = [
        endpoint["tlsConfig"]["ca"]["secret"],
        endpoint["basicAuth"]["username"],
        endpoint["basicAuth"]["password"],
    ]
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"], "the operator looks the Secret up by name"
        assert ref["key"] in secret["data"]
    assert _data(secret, endpoint["basicAuth"]["password"]["key"]) == b"s3cret"
    # The certificate's name: the Service's (the documented openssl command puts it in the SAN).
    assert (
        endpoint["tlsConfig"]["serverName"] == _one(secure.objects, "Service")["metadata"]["name"]
    )
    assert "DNS:esper-telemetryd," in (K8S / "secure" / "kustomization.yaml").read_text()
    assert "PrometheusRule" in {o["kind"] for o in secure.operator}
