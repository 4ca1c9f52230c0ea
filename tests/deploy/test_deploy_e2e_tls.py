"""A real Prometheus 2.42 scrapes the daemon over TLS with basic auth (``--web.config.file``).

The test makes a CA, a server certificate for 127.0.0.1, a client certificate, and a bcrypt
hash; the daemon serves with the exporter toolkit's web config; Prometheus scrapes with
``scheme: https``, ``tls_config`` (the CA, its client certificate) and ``basic_auth``. A
second job with a wrong password shows Prometheus sees the 401. Plain HTTP to the TLS port
fails cleanly; health checks stay open.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon_process import spawn, started
from deploy_support import free_port, stop, tool, wait_until
from tls_support import bcrypt_hash, make_pki

pytestmark = pytest.mark.slow


def https_get(url: str, pki, auth: str | None = None, cert: bool = True):
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return reply.status, reply.read().decode(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


@pytest.fixture
def secured(tmp_path):
    pki = make_pki(tmp_path / "pki")
    web = tmp_path / "web.yml"
    web.write_text(
        json.dumps(
            {
                "tls_server_config": {
                    "cert_file": str(pki.server_cert),
                    "key_file": str(pki.server_key),
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "client_ca_file": str(pki.ca),
                },
                "basic_auth_users": {"prometheus": bcrypt_hash("s3cret", cost=10)},
            }
        )
    )
    proc = spawn(
        "--zmq.listen-address=tcp://127.0.0.1:*",
        "--web.listen-address=127.0.0.1:0",
        f"--web.config.file={web}",
    )
    try:
        (endpoint,), address = started(proc)
        yield {"pki": pki, "address": address, "endpoint": endpoint, "tmp": tmp_path}
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_metrics_need_a_verified_client_and_the_password_health_does_not(secured) -> None:
    pki, address = secured["pki"], secured["address"]
    base = f"https://{address}"
    status, body, _ = https_get(f"{base}/metrics", pki, auth="prometheus:s3cret")
    assert status == 200 and "esper_daemon_messages_total" in body
    for auth in ("prometheus:wrong", "nobody:s3cret", None):
        status, _, headers = https_get(f"{base}/metrics", pki, auth=auth)
        assert status == 401, auth
        assert headers.get("WWW-Authenticate", "").startswith("Basic"), headers
    # The live page and its JSON API too: the same credentials, or 401.
    for path in ("/", "/runs/x", "/static/chart.js", "/api/v1/runs", "/api/v1/runs/x/history"):
        status, _, headers = https_get(f"{base}{path}", pki)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
    status, body, _ = https_get(f"{base}/api/v1/runs", pki, auth="prometheus:s3cret")
    assert status == 200 and json.loads(body)["runs"] == []
    for path in ("/-/healthy", "/-/ready"):  # open, for probes
        assert https_get(f"{base}{path}", pki)[0] == 200, path
    # Every 401 is counted where an operator looks.
    status, body, _ = https_get(f"{base}/metrics", pki, auth="prometheus:s3cret")
    assert 'esper_daemon_http_refused_total{reason="unauthorized"} 8.0' in body, body[-2000:]
    # No client certificate: the TLS handshake itself is refused.
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        https_get(f"{base}/-/healthy", pki, cert=False)
    # Plain HTTP to the TLS port fails cleanly (no hang, no answer that looks like metrics).
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.settimeout(5)
        try:
            reply = conn.recv(4096)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert b"esper_" not in reply


def test_prometheus_scrapes_over_tls_with_basic_auth(secured) -> None:
    pki, tmp = secured["pki"], secured["tmp"]
    (tmp / "password").write_text("s3cret\n")
    (tmp / "wrong").write_text("guess\n")

    def job(name: str, password_file: Path) -> dict:
        return {
            "job_name": name,
            "scheme": "https",
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "tls_config": {
                "ca_file": str(pki.ca),
                "cert_file": str(pki.client_cert),
                "key_file": str(pki.client_key),
            },
            "basic_auth": {"username": "prometheus", "password_file": str(password_file)},
            "static_configs": [{"targets": [secured["address"]]}],
        }

    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    job("esper-telemetryd", tmp / "password"),
                    job("wrong-password", tmp / "wrong"),
                ],
            }
        )
    )
    check = subprocess.run(
        [tool("promtool"), "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def targets() -> dict[str, dict] | None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/targets", timeout=2
                ) as r:
                    active = json.load(r)["data"]["activeTargets"]
            except (OSError, ValueError):
                return None
            by_job = {t["labels"]["job"]: t for t in active}
            done = len(by_job) == 2 and all(t["health"] != "unknown" for t in by_job.values())
            return by_job if done else None

        by_job = wait_until(targets, 60, "Prometheus to scrape both jobs")
        assert by_job["esper-telemetryd"]["health"] == "up", by_job["esper-telemetryd"]
        assert by_job["wrong-password"]["health"] == "down"
        assert "401" in by_job["wrong-password"]["lastError"], by_job["wrong-password"]

        def value() -> float | None:
            url = (
                f"http://127.0.0.1:{port}/api/v1/query?query="
                "esper_daemon_build_info%7Bjob%3D%22esper-telemetryd%22%7D"
            )
            with urllib.request.urlopen(url, timeout=2) as r:
                result = json.load(r)["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        assert wait_until(value, 20, "a sample scraped over TLS") == 1.0
    finally:
        stop(proc)
        log.close()
