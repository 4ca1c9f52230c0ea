"""The systemd unit and its environment file."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from deploy_support import DEPLOY, daemon_command

from esper_telemetry import defaults
from esper_telemetry.daemon.config import SETTINGS, Config

UNIT = DEPLOY / "systemd" / "esper-telemetryd.service"
SECURE = DEPLOY / "systemd" / "esper-telemetryd.service.d" / "secure.conf"
CREDENTIALS = "/run/credentials/esper-telemetryd.service"
ENV_FILE = DEPLOY / "systemd" / "esper-telemetryd.env"
# The variables only the training side reads.
COLLECTOR_ENV = {
    defaults.ENV_RUN,
    defaults.ENV_ENDPOINT,
    defaults.ENV_SERVER_PUBLIC_KEY_FILE,
    defaults.ENV_CLIENT_SECRET_KEY_FILE,
}


def daemon_env_names() -> set:
    """The daemon's variables: one per row of its settings table."""
    names = {row.env for row in SETTINGS}
    assert not names & COLLECTOR_ENV
    return names


def unit(path=UNIT) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (systemd keys repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return out


def test_unit_is_hardened() -> None:
    s = unit()["Service"]
    expect = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expect.items():
        assert s.get(key) == [value], f"{key}={s.get(key)}"
    assert "User" not in s, "DynamicUser allocates the user"
    assert "@system-service" in s["SystemCallFilter"]


def test_unit_runs_the_daemon_and_checks_config_first() -> None:
    s = unit()["Service"]
    (start,) = s["ExecStart"]
    assert start.split()[0].endswith("/bin/esper-telemetryd")
    assert s["ExecStartPre"] == [start.split()[0] + " --check-config"]
    assert s["EnvironmentFile"] == ["-/etc/default/esper-telemetryd"]
    assert s["KillSignal"] == ["SIGTERM"]
    # Graceful shutdown (drain + linger, by default 10 s + 0 s) fits in the stop timeout.
    stop_s = int(re.fullmatch(r"(\d+)s", s["TimeoutStopSec"][0]).group(1))
    assert stop_s > Config().shutdown_timeout_s + Config().shutdown_linger_s
    assert int(s["LimitNOFILE"][0]) >= 65536
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def env_file() -> dict[str, str]:
    """Every ESPER_* assignment in the file, commented (the defaults) or not."""
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        m = re.fullmatch(r"#?(ESPER_[A-Z_]+)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_env_file_documents_exactly_the_daemon_settings() -> None:
    names = set(env_file())
    assert names - daemon_env_names() == set(), "unknown variables (typos?)"
    assert daemon_env_names() - names == set(), "daemon settings the file does not document"


def test_env_file_defaults_match_the_code() -> None:
    # Every commented default is the row's, read by the row's own parser (the three
    # credentials' lines show where an installed service finds them instead).
    env = env_file()
    checked = 0
    for row in SETTINGS:
        if row.env in SECURE_ENV:
            continue
        text = env[row.env]
        value = row.parse(tuple(text.split(",")) if row.repeatable else text)
        assert value == getattr(Config(), row.name), f"{row.env}={text}"
        checked += 1
    assert checked == len(SETTINGS) - len(SECURE_ENV)


def test_env_file_is_accepted_by_the_daemon() -> None:
    # Uncomment every default and ask the daemon itself: --check-config exits 0. The key
    # and web-config paths name files only an installed service has (checked below).
    env = {"PATH": "/usr/bin:/bin", **{k: v for k, v in env_file().items() if k not in SECURE_ENV}}
    result = subprocess.run(
        [*daemon_command(), "--check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    # ... and a typo in a value is refused (the check is real).
    env["ESPER_RUN_TTL_SECONDS"] = "five minutes"
    result = subprocess.run(
        [*daemon_command(), "--check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "esper-telemetryd" in result.stderr


def test_systemd_analyze_verify(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (the static checks above still ran)")
    exe = daemon_command()[0]
    text = UNIT.read_text().replace("/opt/esper-telemetry/bin/esper-telemetryd", exe)
    # With the secure drop-in's lines too (a repeated [Service] section is what a drop-in is).
    path = tmp_path / UNIT.name
    path.write_text(text + "\n" + SECURE.read_text())
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [ln for ln in (result.stdout + result.stderr).splitlines() if UNIT.name in ln]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_daemon_reads_every_documented_variable() -> None:
    # The daemon's own --help names the variable of every flag.
    result = subprocess.run(
        [*daemon_command(), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for name in env_file():
        assert name in help_text, f"{name} is documented but the daemon does not read it"


SECURE_ENV = {
    "ESPER_ZMQ_CURVE_SECRET_KEY_FILE",
    "ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR",
    "ESPER_WEB_CONFIG_FILE",
}


def secure_env() -> dict[str, str]:
    s = unit(SECURE)["Service"]
    return dict(line.split("=", 1) for line in s.get("Environment", []))


def credentials() -> dict[str, str]:
    """Credential name -> the root-only file systemd reads it from."""
    return dict(line.split(":", 1) for line in unit(SECURE)["Service"]["LoadCredential"])


def test_unit_reloads_keys_on_sighup() -> None:
    assert unit()["Service"]["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_secure_dropin_hands_secrets_in_as_credentials() -> None:
    env, creds = secure_env(), credentials()
    assert set(env) == SECURE_ENV
    # The secret key and the web configuration are systemd's copies of credentials.
    for name in ("ESPER_ZMQ_CURVE_SECRET_KEY_FILE", "ESPER_WEB_CONFIG_FILE"):
        folder, _, cred = env[name].rpartition("/")
        assert folder == CREDENTIALS and cred in creds, env[name]
    assert creds["daemon.key_secret"].endswith("/daemon.key_secret")
    # Everything the web configuration names relatively comes in next to it.
    assert {"web-config.yml", "tls.crt", "tls.key"} <= set(creds)
    # Sources outside any world-readable default place, not the env file's folder.
    for source in creds.values():
        assert source.startswith("/etc/esper-telemetryd/private/"), source
    # Public keys: a plain path, re-readable (a credential is copied once at start).
    keys_dir = env["ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR"]
    assert not keys_dir.startswith("/run/credentials/") and keys_dir not in creds.values()
    # The env file documents the same paths.
    documented = env_file()
    for name in SECURE_ENV:
        assert documented[name] == env[name], name


def test_secure_dropin_settings_pass_the_daemons_check(tmp_path) -> None:
    """The drop-in's settings, with its credentials and keys made the documented way, are a
    configuration the daemon accepts; a broken web configuration among them is refused."""
    from tls_support import bcrypt_hash, make_pki

    from esper_telemetry.certificates import write_key_pair

    creds = tmp_path / "credentials"
    keys = tmp_path / "authorized-keys"
    creds.mkdir()
    keys.mkdir()
    write_key_pair(str(creds), "daemon")
    write_key_pair(str(keys), "trainer-0")
    pki = make_pki(tmp_path / "pki")
    (creds / "tls.crt").write_bytes(pki.server_cert.read_bytes())
    (creds / "tls.key").write_bytes(pki.server_key.read_bytes())
    web = (
        "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n"
        f"basic_auth_users:\n  prometheus: '{bcrypt_hash('s3cret')}'\n"
    )
    (creds / "web-config.yml").write_text(web)
    env = {"PATH": "/usr/bin:/bin"}
    for name, value in secure_env().items():
        value = value.replace(CREDENTIALS, str(creds))
        env[name] = value.replace(secure_env()["ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR"], str(keys))
    result = subprocess.run(
        [*daemon_command(), "--check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    (creds / "web-config.yml").write_text(web.replace("cert_file", "certfile"))
    result = subprocess.run(
        [*daemon_command(), "--check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "certfile" in result.stderr, result.stderr
