"""The daemon's image and the compose stack, checked by reading (no Docker engine here),
plus the image's health check run for real against a daemon."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import DEPLOY, ROOT, daemon_command, free_port, load_yaml, stop, wait_until

from esper_telemetry import defaults
from esper_telemetry.daemon.config import SETTINGS

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"


def instructions() -> list[tuple[str, str]]:
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


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_image_installs_the_daemon_extra_and_never_torch() -> None:
    runs = " ".join(arg for word, arg in instructions() if word == "RUN")
    assert re.search(r"pip install\b[^&]*'\.\[daemon\]'", runs), runs
    for forbidden in ("[collector]", "[dev]", "pip install torch", "ci-constraints"):
        assert forbidden not in runs, forbidden
    # The build fails if torch is importable.
    assert "import torch" in runs and "exit 1" in runs
    # Only the distribution's sources are copied, and they exist in the checkout.
    for word, arg in instructions():
        if word == "COPY" and not arg.startswith("--from"):
            *sources, _dest = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") in (
                    "pyproject.toml",
                    "README.md",
                    "esper_telemetry",
                    "daemon",
                    "collector",
                ), src


def test_image_runs_as_non_root_with_a_health_check() -> None:
    final = final_stage()
    users = [arg for word, arg in final if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        "run as a numeric non-root uid (runAsNonRoot can verify it)"
    )
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


def healthcheck_argv() -> list[str]:
    (check,) = [arg for word, arg in final_stage() if word == "HEALTHCHECK"]
    cmd = check[check.index("CMD") + 3 :].strip()
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
        assert env in {row.env for row in SETTINGS}, env  # the daemon's variables

    def mounts(service: str) -> dict:
        out = {}
        for v in services[service]["volumes"]:
            src, dst = v.split(":")[:2]
            out[dst] = src
        return out

    prom = mounts("prometheus")
    assert (
        COMPOSE.parent / prom["/etc/prometheus/prometheus.yml"]
    ).resolve() == DEPLOY / "docker" / "prometheus.yml"
    assert (
        COMPOSE.parent / prom["/etc/prometheus/rules"]
    ).resolve() == DEPLOY / "prometheus" / "rules"
    assert (
        services["prometheus"]["depends_on"]["esper-telemetryd"]["condition"] == "service_healthy"
    )
    prom_config = load_yaml(DEPLOY / "docker" / "prometheus.yml")
    assert prom_config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    targets = prom_config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"esper-telemetryd:{defaults.DEFAULT_WEB_PORT}"]

    graf = mounts("grafana")
    assert (
        COMPOSE.parent / graf["/etc/grafana/provisioning"]
    ).resolve() == DEPLOY / "docker" / "grafana" / "provisioning"
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


# --- the secured stack: keys from the one-shot `secrets` service ---------------------------

SECRETS_SH = DEPLOY / "docker" / "secrets.sh"
PROMETHEUS_UID, DAEMON_UID = 65534, 65532


def _volume(spec: str) -> tuple[str, str, str]:
    """(source, target, options) of a short volume syntax."""
    parts = spec.split(":")
    return parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"


def test_compose_daemon_reads_keys_from_read_only_mounts() -> None:
    services = load_yaml(COMPOSE)["services"]
    d = services["esper-telemetryd"]
    env = d["environment"]
    mounts = {target: (src, opts) for src, target, opts in map(_volume, d["volumes"])}
    for name in (
        "ESPER_ZMQ_CURVE_SECRET_KEY_FILE",
        "ESPER_WEB_CONFIG_FILE",
        "ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR",
    ):
        path = env[name]
        (target,) = [t for t in mounts if path == t or path.startswith(t + "/")]
        assert mounts[target][1] == "ro", f"{name} is under a writable mount"
    secrets_target = env["ESPER_ZMQ_CURVE_SECRET_KEY_FILE"].split("/")[1]
    assert mounts["/" + secrets_target][0] == "secrets"
    assert "secrets" in load_yaml(COMPOSE)["volumes"]
    src, _ = mounts[env["ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR"]]
    assert (COMPOSE.parent / src).is_dir(), "the authorized-keys folder ships (empty)"
    assert d["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
    assert (
        services["prometheus"]["depends_on"]["secrets"]["condition"]
        == "service_completed_successfully"
    )
    prom = {
        target: (src, opts) for src, target, opts in map(_volume, services["prometheus"]["volumes"])
    }
    assert prom["/secrets"] == ("secrets", "ro")


def test_compose_secrets_service_runs_the_script_with_least_privilege() -> None:
    s = load_yaml(COMPOSE)["services"]["secrets"]
    assert s["image"] == load_yaml(COMPOSE)["services"]["esper-telemetryd"]["image"]
    mounts = {target: (src, opts) for src, target, opts in map(_volume, s["volumes"])}
    script = s["entrypoint"][-1]
    assert (COMPOSE.parent / mounts[script][0]).resolve() == SECRETS_SH and mounts[script][
        1
    ] == "ro"
    assert mounts["/secrets"] == ("secrets", "rw")
    assert s["cap_drop"] == ["ALL"] and set(s["cap_add"]) <= {"CHOWN", "FOWNER"}
    assert s["network_mode"] == "none" and s["read_only"] is True
    assert s["restart"] == "no"
    # The image has what the script calls, or its build fails.
    final_runs = " ".join(arg for word, arg in final_stage() if word == "RUN")
    assert "command -v openssl" in final_runs and "esper-telemetry keygen" in SECRETS_SH.read_text()


def test_grafana_admin_password_has_no_known_default() -> None:
    env = load_yaml(COMPOSE)["services"]["grafana"]["environment"]
    value = env["GF_SECURITY_ADMIN_PASSWORD"]
    # ${VAR:?message}: compose refuses to start without it (no ${VAR:-admin}).
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", value), value


def _run_secrets_sh(root: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SECRETS_DIR": str(root)}
    return subprocess.run(
        ["/bin/sh", str(SECRETS_SH)], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def made_secrets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compose") / "secrets"
    result = _run_secrets_sh(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_secrets_script_modes_and_owners(made_secrets) -> None:
    d, p = made_secrets / "daemon", made_secrets / "prometheus"
    modes = {f"daemon/{n}": 0o400 for n in ("daemon.key_secret", "tls.key", "web-config.yml")}
    modes.update({f"daemon/{n}": 0o444 for n in ("daemon.key", "tls.crt")})
    modes.update(
        {
            "prometheus/password": 0o400,
            "prometheus/ca.crt": 0o444,
            "daemon": 0o750,
            "prometheus": 0o750,
            "ca": 0o700,
        }
    )
    for name, mode in modes.items():
        assert stat.S_IMODE((made_secrets / name).stat().st_mode) == mode, name
    if os.geteuid() == 0:  # the chowns only run as root, as in the container
        assert {f.stat().st_uid for f in d.iterdir()} == {DAEMON_UID}
        assert d.stat().st_gid == DAEMON_UID and d.stat().st_uid == 0
        assert {f.stat().st_uid for f in p.iterdir()} == {PROMETHEUS_UID}
        assert p.stat().st_gid == PROMETHEUS_UID and p.stat().st_uid == 0


def test_secrets_script_never_overwrites(made_secrets) -> None:
    before = {f: f.read_bytes() for f in made_secrets.rglob("*") if f.is_file()}
    result = _run_secrets_sh(made_secrets)
    assert result.returncode == 0, result.stdout + result.stderr
    after = {f: f.read_bytes() for f in made_secrets.rglob("*") if f.is_file()}
    assert after == before


def test_secrets_script_output_is_what_the_daemon_and_prometheus_accept(
    made_secrets, tmp_path
) -> None:
    import bcrypt

    compose = load_yaml(COMPOSE)["services"]
    d = made_secrets / "daemon"
    # The password Prometheus sends is the one the daemon's hash admits.
    web = load_yaml(d / "web-config.yml")
    ((user, hashed),) = web["basic_auth_users"].items()
    scrape = load_yaml(DEPLOY / "docker" / "prometheus.yml")["scrape_configs"][0]
    assert scrape["scheme"] == "https" and scrape["basic_auth"]["username"] == user
    password_file = Path(
        scrape["basic_auth"]["password_file"].replace("/secrets", str(made_secrets))
    )
    assert bcrypt.checkpw(password_file.read_bytes(), hashed.encode())
    # The certificate is signed by the CA Prometheus trusts, for the name it checks.
    ca_file = scrape["tls_config"]["ca_file"].replace("/secrets", str(made_secrets))
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            ca_file,
            "-verify_hostname",
            scrape["tls_config"]["server_name"],
            str(d / web["tls_server_config"]["cert_file"]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (
        scrape["static_configs"][0]["targets"][0].split(":")[0]
        == scrape["tls_config"]["server_name"]
    )
    # The daemon's settings in compose.yaml, on these files, pass its own check.
    keys = tmp_path / "authorized-keys"
    keys.mkdir()
    from esper_telemetry.certificates import write_key_pair

    write_key_pair(keys, "trainer")
    env = {"PATH": "/usr/bin:/bin"}
    for name, value in compose["esper-telemetryd"]["environment"].items():
        env[name] = (
            str(value).replace("/secrets", str(made_secrets)).replace("/authorized-keys", str(keys))
        )
    result = subprocess.run(
        [*daemon_command(), "--check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_healthcheck_command_speaks_tls_when_the_web_config_has_it(made_secrets, tmp_path) -> None:
    """Needs the daemon to serve --web.config.file: /-/healthy over TLS, without a password."""
    import ssl
    import urllib.request

    web = tmp_path / "web"
    shutil.copytree(made_secrets / "daemon", web)
    for f in web.iterdir():
        f.chmod(0o600)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
    proc = subprocess.Popen(
        [
            *daemon_command(),
            f"--zmq.listen-address=tcp://127.0.0.1:{free_port()}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.config.file={web / 'web-config.yml'}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        context = ssl._create_unverified_context()

        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/-/healthy", timeout=1, context=context
                ) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(healthy, 20, "the daemon's /-/healthy over TLS")
        base_env = {**os.environ, "ESPER_WEB_LISTEN_ADDRESS": f"0.0.0.0:{port}"}
        with_tls = {**base_env, "ESPER_WEB_CONFIG_FILE": str(web / "web-config.yml")}
        result = subprocess.run(healthcheck_argv(), env=with_tls, capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        # Plain HTTP against the TLS port fails: the check follows the config.
        base_env.pop("ESPER_WEB_CONFIG_FILE", None)
        result = subprocess.run(healthcheck_argv(), env=base_env, capture_output=True, timeout=30)
        assert result.returncode != 0
    finally:
        stop(proc)
