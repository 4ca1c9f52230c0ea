"""The commented TLS + basic-auth scrape job of deploy/prometheus/prometheus.yml, uncommented
and checked by promtool against files made the way docs/deploy.md says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from deploy_support import DEPLOY, tool

HOST_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
FILES = "/etc/prometheus/esper-telemetryd/"


def secure_job_text(client_certs: bool) -> str:
    """The commented job, uncommented (and its client-certificate lines, if asked)."""
    lines = HOST_CONFIG.read_text().splitlines()
    start = lines.index("  #- job_name: esper-telemetryd")
    block: list[str] = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        text = "  " + line[3:]
        if (
            client_certs
            and text.lstrip().startswith("#cert_file")
            or client_certs
            and text.lstrip().startswith("#key_file")
        ):
            text = text.replace("#", "", 1)
        block.append(text)
    return "\n".join(block) + "\n"


def secure_job(client_certs: bool) -> dict:
    import yaml

    (job,) = yaml.safe_load("scrape_configs:\n" + secure_job_text(client_certs))["scrape_configs"]
    return job


@pytest.mark.parametrize("client_certs", [False, True], ids=["basic-auth", "client-certs"])
def test_secure_job_passes_promtool(tmp_path: Path, client_certs: bool) -> None:
    from tls_support import make_pki

    job = secure_job(client_certs)
    assert job["job_name"] == "esper-telemetryd"  # EsperTelemetryDaemonDown watches it
    assert job["scheme"] == "https"
    tls, auth = job["tls_config"], job["basic_auth"]
    assert tls["ca_file"].startswith(FILES) and auth["password_file"].startswith(FILES)
    assert auth["username"] and "password" not in auth  # never inline
    assert ("cert_file" in tls and "key_file" in tls) is client_certs

    pki = make_pki(tmp_path / "pki")
    files = tmp_path / "esper-telemetryd"
    files.mkdir()
    (files / "ca.crt").write_bytes(pki.ca.read_bytes())
    (files / "client.crt").write_bytes(pki.client_cert.read_bytes())
    (files / "client.key").write_bytes(pki.client_key.read_bytes())
    (files / "password").write_text("s3cret\n")
    text = secure_job_text(client_certs).replace(FILES, f"{files}/")
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs:\n" + text)

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool("promtool"), "check", "config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    # The check is real: promtool refuses a misspelt field, and stats the client
    # certificate (only that: it never opens ca_file or password_file).
    if client_certs:
        (files / "client.crt").unlink()
        result = check()
        assert result.returncode != 0 and "client.crt" in result.stdout + result.stderr
    else:
        config.write_text(config.read_text().replace("password_file", "passwd_file"))
        result = check()
        assert result.returncode != 0 and "passwd_file" in result.stdout + result.stderr
