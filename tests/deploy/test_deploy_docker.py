"""The daemon's image and the compose stack, checked by reading (no Docker engine here),
plus the image's health check run for real against a daemon."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import List, Tuple


from esper_telemetry import defaults

from deploy_support import DEPLOY, ROOT, free_port, load_yaml

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"


def instructions() -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage() -> List[Tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_image_installs_the_daemon_extra_and_never_torch() -> None:
    runs = " ".join(arg for word, arg in instructions() if word == "RUN")
    assert re.search(r"pip install\b[^&]*'\.\[daemon\]'", runs), runs
    for forbidden in ("[collector]", "[dev]", "pip install torch", "ci-constraints"):
        assert forbidden not in runs, forbidden
    # The build fails if torch is importable.
    assert 'import torch' in runs and "exit 1" in runs
    # Only the distribution's sources are copied, and they exist in the checkout.
    for word, arg in instructions():
        if word == "COPY" and not arg.startswith("--from"):
            *sources, _dest = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") in ("pyproject.toml", "README.md", "esper_telemetry",
                                           "daemon", "collector"), src


def test_image_runs_as_non_root_with_a_health_check() -> None:
    final = final_stage()
    users = [arg for word, arg in final if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "run as a numeric non-root uid (runAsNonRoot can verify it)"
    checks = [arg for word, arg in final if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "/-/healthy" in checks[0]
    entry = [arg for word, arg in final if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["esper-telemetryd"]
    env = " ".join(arg for word, arg in final if word == "ENV")
    # In a container the daemon must listen beyond loopback, on the default ports.
    assert f"ESPER_WEB_LISTEN_ADDRESS=0.0.0.0:{defaults.DEFAULT_WEB_PORT}" in env
    assert f"ESPER_ZMQ_LISTEN_ADDRESS=tcp://0.0.0.0:{defaults.DEFAULT_ZMQ_PORT}" in env
    exposed = " ".join(arg for word, arg in final if word == "EXPOSE")
    assert str(defaults.DEFAULT_WEB_PORT) in exposed and str(defaults.DEFAULT_ZMQ_PORT) in exposed


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything out, then the sources back in
    for src in ("pyproject.toml", "README.md", "esper_telemetry/", "daemon/", "collector/"):
        assert f"!{src}" in ignore, src


def healthcheck_argv() -> List[str]:
    (check,) = [arg for word, arg in final_stage() if word == "HEALTHCHECK"]
    cmd = check[check.index("CMD") + 3:].strip()
    argv = json.loads(cmd)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def test_healthcheck_command_passes_on_a_live_daemon(daemon) -> None:
    env = {**os.environ, "ESPER_WEB_LISTEN_ADDRESS": f"0.0.0.0:{daemon.web_port}"}
    result = subprocess.run(healthcheck_argv(), env=env, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_healthcheck_command_fails_when_nothing_answers() -> None:
    env = {**os.environ, "ESPER_WEB_LISTEN_ADDRESS": f"0.0.0.0:{free_port()}"}
    result = subprocess.run(healthcheck_argv(), env=env, capture_output=True, timeout=30)
    assert result.returncode != 0


def test_compose_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) >= {"esper-telemetryd", "prometheus", "grafana"}
    d = services["esper-telemetryd"]
    assert d["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (COMPOSE.parent / d["build"]["context"]).resolve() == ROOT
    assert d["read_only"] is True and d["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in d["security_opt"]
    assert d["user"].split(":")[0] != "0"
    ports = set(d["ports"])
    assert f"127.0.0.1:{defaults.DEFAULT_ZMQ_PORT}:{defaults.DEFAULT_ZMQ_PORT}" in ports
    assert f"127.0.0.1:{defaults.DEFAULT_WEB_PORT}:{defaults.DEFAULT_WEB_PORT}" in ports
    for env in d.get("environment", {}):
        assert env.startswith("ESPER_") and env in {
            v for k, v in vars(defaults).items() if k.startswith("ENV_")}, env

    def mounts(service: str) -> dict:
        out = {}
        for v in services[service]["volumes"]:
            src, dst = v.split(":")[:2]
            out[dst] = src
        return out

    prom = mounts("prometheus")
    assert (COMPOSE.parent / prom["/etc/prometheus/prometheus.yml"]).resolve() == DEPLOY / "docker" / "prometheus.yml"
    assert (COMPOSE.parent / prom["/etc/prometheus/rules"]).resolve() == DEPLOY / "prometheus" / "rules"
    assert services["prometheus"]["depends_on"]["esper-telemetryd"]["condition"] == "service_healthy"
    prom_config = load_yaml(DEPLOY / "docker" / "prometheus.yml")
    assert prom_config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    targets = prom_config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"esper-telemetryd:{defaults.DEFAULT_WEB_PORT}"]

    graf = mounts("grafana")
    assert (COMPOSE.parent / graf["/etc/grafana/provisioning"]).resolve() == DEPLOY / "docker" / "grafana" / "provisioning"
    dash_dir = (COMPOSE.parent / graf["/var/lib/grafana/dashboards/esper"]).resolve()
    assert dash_dir == DEPLOY / "grafana" and (dash_dir / "esper-telemetry.json").exists()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/esper/esper-telemetry.json"


def test_grafana_provisioning() -> None:
    prov = DEPLOY / "docker" / "grafana" / "provisioning"
    (ds,) = load_yaml(prov / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(prov / "dashboards" / "esper-telemetry.yaml")["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/esper"
