"""``--web.config.file``: the exporter toolkit's format read strictly, with clear errors."""

from __future__ import annotations

import base64
import json
import ssl

import pytest
from tls_support import bcrypt_hash, make_pki

from esper_telemetry.daemon.webconfig import WebConfigError, load_web_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path, doc) -> str:
    path = tmp_path / "web.yml"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_tls_with_verified_clients_and_basic_auth(tmp_path, pki) -> None:
    cfg = load_web_config(
        write(
            tmp_path,
            {
                "tls_server_config": {
                    "cert_file": str(pki.server_cert),
                    "key_file": str(pki.server_key),
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "client_ca_file": str(pki.ca),
                    "min_version": "TLS13",
                },
                "basic_auth_users": {"prometheus": bcrypt_hash("s3cret")},
            },
        )
    )
    assert cfg.ssl_context is not None
    assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    auth = cfg.auth
    assert auth is not None
    good = basic("prometheus", "s3cret")
    assert auth.known(good) is None  # not seen yet: bcrypt must decide
    assert auth.check(good) is True
    assert auth.known(good) is True  # remembered: no bcrypt next time
    for bad in (
        basic("prometheus", "wrong"),
        basic("nobody", "s3cret"),
        "Bearer x",
        "Basic !!!",
        None,
        "Basic " + base64.b64encode(b"no-colon").decode(),
    ):
        assert auth.check(bad) is False, bad
    assert "TLS with verified client certificates, basic auth" in cfg.describe()


def test_relative_paths_are_relative_to_the_file_and_tls12_is_the_floor(tmp_path, pki) -> None:
    for p in (pki.server_cert, pki.server_key):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    cfg = load_web_config(
        write(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    )
    assert cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cfg.ssl_context.verify_mode == ssl.CERT_NONE and cfg.auth is None


def test_an_empty_file_means_plain_http_without_auth(tmp_path) -> None:
    cfg = load_web_config(write(tmp_path, ""))
    assert cfg.ssl_context is None and cfg.auth is None


@pytest.mark.parametrize(
    "doc, match",
    [
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_ca_fle": "ca.crt",
                }
            },
            r"unknown field\(s\) \['client_ca_fle'\]",
        ),
        ({"tls_config": {}}, r"unknown field\(s\) \['tls_config'\]"),
        ({"tls_server_config": {"cert_file": "server.crt"}}, "needs both cert_file and key_file"),
        (
            {"tls_server_config": {"cert_file": "nope.crt", "key_file": "server.key"}},
            "cert_file: .*nope.crt' is not a readable file",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_auth_type": "RequireAndVerifyClientCert",
                }
            },
            "needs client_ca_file",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_auth_type": "RequireAnyClientCert",
                    "client_ca_file": "ca.crt",
                }
            },
            "taken unverified",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "min_version": "SSL3",
                }
            },
            "min_version: 'SSL3' is not one of",
        ),
        (
            {"tls_server_config": {"cert_file": "ca.crt", "key_file": "server.key"}},
            "cannot load the certificate and key",
        ),
        ({"basic_auth_users": {"prometheus": "plaintext-password"}}, "not a bcrypt hash"),
        ({"http_server_config": {"http2": True}}, "http_server_config is not supported"),
        ("tls_server_config: [unclosed", "not valid YAML"),
        ("- a list", "the file must be a mapping"),
    ],
)
def test_mistakes_are_errors_naming_the_field(tmp_path, pki, doc, match) -> None:
    for p in (pki.server_cert, pki.server_key, pki.ca):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    with pytest.raises(WebConfigError, match=match):
        load_web_config(write(tmp_path, doc))


def test_a_missing_file_is_an_error(tmp_path) -> None:
    with pytest.raises(WebConfigError, match="cannot read"):
        load_web_config(str(tmp_path / "absent.yml"))
