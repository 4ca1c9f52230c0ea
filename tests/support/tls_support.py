"""A test certificate authority, with server and client certificates, made with the openssl
command line (Debian's, always present where Prometheus is), and bcrypt hashes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import bcrypt


class Pki(NamedTuple):
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    assert tool, "openssl is needed to make test certificates"
    subprocess.run([tool, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(tmp: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=tmp,
    )


def _leaf(tmp: Path, ca: str, name: str, ext: str) -> None:
    (tmp / f"{name}.ext").write_text(ext)
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=tmp,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=tmp,
    )


def make_pki(tmp: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a
    client certificate signed by an unrelated CA."""
    tmp.mkdir(parents=True, exist_ok=True)
    _ca(tmp, "ca")
    _ca(tmp, "other-ca")
    _leaf(
        tmp,
        "ca",
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _leaf(tmp, "ca", "client", "extendedKeyUsage=clientAuth\n")
    _leaf(tmp, "other-ca", "stranger", "extendedKeyUsage=clientAuth\n")
    return Pki(
        tmp / "ca.crt",
        tmp / "server.crt",
        tmp / "server.key",
        tmp / "client.crt",
        tmp / "client.key",
        tmp / "stranger.crt",
        tmp / "stranger.key",
    )


def bcrypt_hash(password: str, cost: int = 4) -> str:
    """A bcrypt hash as htpasswd writes it ($2y$); cost 4 keeps tests fast."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    return "$2y$" + hashed[4:]
