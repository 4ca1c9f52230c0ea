"""``--web.config.file``: TLS and basic authentication for the HTTP side, in the format of
the Prometheus exporter toolkit (the file node_exporter, statsd_exporter and Prometheus
itself take), so one file and one habit serve every exporter on a host::

    tls_server_config:
      cert_file: /etc/esper-telemetryd/tls.crt
      key_file: /etc/esper-telemetryd/tls.key
      client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
      client_ca_file: /etc/esper-telemetryd/ca.crt
      min_version: TLS12                             # default TLS12
    basic_auth_users:
      # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
      prometheus: $2y$10$...

Read the way the toolkit reads it: unknown keys are errors (a misspelt ``client_ca_file``
must not silently turn verification off), relative paths are relative to the file's
folder. What Python's ``ssl`` cannot do is refused with the reason:
``RequestClientCert`` and ``RequireAnyClientCert`` (a client certificate taken without
verifying it), ``cipher_suites``, ``curve_preferences``, ``http_server_config``.

Passwords are checked with bcrypt off the event loop; a user name and password that
passed once are remembered by a keyed digest (as the toolkit caches), so a scrape every
few seconds costs one hash lookup, not a bcrypt. An unknown user costs a bcrypt too, so
timing does not tell which users exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["WebConfig", "WebConfigError", "load_web_config", "BasicAuth"]

_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
}
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED = ("RequestClientCert", "RequireAnyClientCert")
# Cost factor of the dummy hash checked for unknown users (the usual htpasswd -B cost).
_DUMMY_COST = 10


class WebConfigError(ValueError):
    """The web configuration file is unreadable or says something this daemon cannot do."""


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes; remembers successes."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        import bcrypt  # the daemon extra's; imported only when basic auth is configured

        self._bcrypt = bcrypt
        self._users = dict(users)
        self._key = secrets.token_bytes(32)
        self._passed: dict[bytes, None] = {}
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(_DUMMY_COST))

    def _digest(self, user: str, password: bytes) -> bytes:
        return hmac.new(
            self._key, user.encode("utf-8", "surrogateescape") + b"\0" + password, hashlib.sha256
        ).digest()

    @staticmethod
    def credentials(header: str | None) -> tuple | None:
        """(user, password bytes) from an Authorization header value, or None."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (ValueError, TypeError):
            return None
        user, sep, password = raw.partition(b":")
        if not sep:
            return None
        return user.decode("utf-8", "surrogateescape"), password

    def known(self, header: str | None) -> bool | None:
        """True if these credentials passed before, False if malformed or absent, None when
        a bcrypt check (``check``, slow: run it off the loop) must decide."""
        creds = self.credentials(header)
        if creds is None:
            return False
        return True if self._digest(*creds) in self._passed else None

    def check(self, header: str | None) -> bool:
        """The full check, bcrypt included (tens of milliseconds: not on the event loop)."""
        creds = self.credentials(header)
        if creds is None:
            return False
        user, password = creds
        digest = self._digest(user, password)
        if digest in self._passed:
            return True
        hashed = self._users.get(user)
        try:
            ok = self._bcrypt.checkpw(password, hashed if hashed is not None else self._dummy)
        except ValueError:  # a hash bcrypt cannot read: refused at load, but never crash here
            ok = False
        ok = ok and hashed is not None
        if ok:
            if len(self._passed) >= 1024:  # bounded: a flood of valid pairs cannot grow it
                self._passed.clear()
            self._passed[digest] = None
        return ok


class WebConfig(NamedTuple):
    """What the file configures: a server SSL context (None: plain HTTP), basic auth (None:
    open)."""

    ssl_context: ssl.SSLContext | None
    auth: BasicAuth | None
    path: str

    def describe(self) -> str:
        tls = "TLS" if self.ssl_context is not None else "plain HTTP"
        if self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_REQUIRED:
            tls += " with verified client certificates"
        auth = "basic auth" if self.auth is not None else "no authentication"
        return f"{tls}, {auth} ({self.path})"


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _path(base: Path, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"{where} must be a file path")
    path = Path(value) if os.path.isabs(value) else base / value
    if not path.is_file():
        raise WebConfigError(f"{where}: {str(path)!r} is not a readable file")
    return str(path)


def _tls(base: Path, tls: dict[str, Any]) -> ssl.SSLContext | None:
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise WebConfigError(f"tls_server_config: unknown field(s) {sorted(unknown)}")
    for unsupported in ("cipher_suites", "curve_preferences"):
        if tls.get(unsupported):
            raise WebConfigError(
                f"tls_server_config.{unsupported} is not supported here "
                f"(Python's ssl module): leave it out to use OpenSSL's defaults"
            )
    if not tls.get("cert_file") and not tls.get("key_file"):
        if any(tls.get(k) for k in ("client_ca_file", "client_auth_type", "min_version")):
            raise WebConfigError("tls_server_config without cert_file and key_file")
        return None
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise WebConfigError("tls_server_config needs both cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(
            _path(base, tls["cert_file"], "tls_server_config.cert_file"),
            _path(base, tls["key_file"], "tls_server_config.key_file"),
        )
    except ssl.SSLError as exc:
        raise WebConfigError(
            f"tls_server_config: cannot load the certificate and key: {exc}"
        ) from None
    for field, default, attr in (
        ("min_version", "TLS12", "minimum_version"),
        ("max_version", None, "maximum_version"),
    ):
        name = tls.get(field) or default
        if name is None:
            continue
        if name not in _VERSIONS:
            raise WebConfigError(
                f"tls_server_config.{field}: {name!r} is not one of {sorted(_VERSIONS)}"
            )
        setattr(context, attr, _VERSIONS[name])
    auth_type = tls.get("client_auth_type") or "NoClientCert"
    if auth_type in _UNVERIFIED:
        raise WebConfigError(
            f"tls_server_config.client_auth_type {auth_type} (a client certificate "
            f"taken unverified) is not supported; use VerifyClientCertIfGiven or "
            f"RequireAndVerifyClientCert with client_ca_file"
        )
    if auth_type not in _CLIENT_AUTH:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: {auth_type!r} is not one of "
            f"{sorted(list(_CLIENT_AUTH) + list(_UNVERIFIED))}"
        )
    ca = tls.get("client_ca_file")
    if auth_type != "NoClientCert" and not ca:
        raise WebConfigError(f"tls_server_config.client_auth_type {auth_type} needs client_ca_file")
    if ca:
        try:
            context.load_verify_locations(_path(base, ca, "tls_server_config.client_ca_file"))
        except ssl.SSLError as exc:
            raise WebConfigError(f"tls_server_config.client_ca_file: {exc}") from None
    context.verify_mode = _CLIENT_AUTH[auth_type]
    return context


def _users(users: dict[str, Any]) -> BasicAuth | None:
    if not users:
        return None
    hashes: dict[str, bytes] = {}
    for user, hashed in users.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"basic_auth_users: {user!r} is not a user name")
        if (
            not isinstance(hashed, str)
            or not hashed.startswith(("$2a$", "$2b$", "$2y$"))
            or len(hashed) != 60
        ):
            raise WebConfigError(
                f"basic_auth_users.{user}: not a bcrypt hash (60 characters, "
                f"$2y$...; make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
            )
        hashes[user] = hashed.encode("ascii")
    try:
        return BasicAuth(hashes)
    except ImportError:
        raise WebConfigError(
            "basic_auth_users needs the bcrypt package: pip install 'esper-telemetry[daemon]'"
        ) from None


def load_web_config(path: str) -> WebConfig:
    """Read and check the file; WebConfigError says what is wrong, naming the field."""
    try:
        import yaml
    except ImportError:
        raise WebConfigError(
            "--web.config.file needs PyYAML: pip install 'esper-telemetry[daemon]'"
        ) from None
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise WebConfigError(f"cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{path!r} is not valid YAML: {exc}") from None
    doc = _mapping(doc, "the file")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise WebConfigError(f"unknown field(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    if doc.get("http_server_config"):
        raise WebConfigError(
            "http_server_config is not supported (HTTP/2 and extra headers); leave it out"
        )
    base = Path(path).resolve().parent
    try:
        context = _tls(base, _mapping(doc.get("tls_server_config"), "tls_server_config"))
        auth = _users(_mapping(doc.get("basic_auth_users"), "basic_auth_users"))
    except WebConfigError as exc:
        raise WebConfigError(f"{path}: {exc}") from None
    return WebConfig(context, auth, path)
