"""CURVE keys for the collector's socket: reading them at attach, and writing a pair (keygen).

Keys travel as ZeroMQ certificate files, the format ``zmq.auth.create_certificates``
writes and the daemon reads: ``NAME.key`` holds the public key, ``NAME.key_secret`` the
public and the secret key. A collector needs the daemon's public key (the server's ``.key``)
and its own secret certificate (a client's ``.key_secret``); the daemon admits the client
when the client's ``.key`` is in its authorized-keys directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import zmq

__all__ = ["CurveKeys", "load_client_keys", "keygen"]


class CurveKeys(NamedTuple):
    """Z85-encoded keys for a CURVE client socket."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes


def _read(path: os.PathLike, argument: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth  # only with CURVE: it costs ~10 ms of attach otherwise

    what = (
        "secret certificate (NAME.key_secret)" if want_secret else "public certificate (NAME.key)"
    )
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{argument}={os.fspath(path)!r}: cannot read a ZeroMQ {what}: {exc}"
        ) from None
    if want_secret and secret is None:
        raise ValueError(
            f"{argument}={os.fspath(path)!r} holds no secret key: give the client's "
            f".key_secret file, not its public .key"
        )
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise ValueError(f"{argument}={os.fspath(path)!r}: a key is not 40 Z85 characters")
    return public, secret


def load_client_keys(
    server_public_key_file: os.PathLike | None, client_secret_key_file: os.PathLike | None
) -> CurveKeys | None:
    """The keys for a CURVE client, or None when neither file is given (plain ZeroMQ).

    Raises ValueError naming the argument when only one file is given, when a file cannot be
    read or holds no key of the kind needed, or when this libzmq was built without CURVE.
    """
    if server_public_key_file is None and client_secret_key_file is None:
        return None
    if server_public_key_file is None or client_secret_key_file is None:
        missing = (
            "server_public_key_file" if server_public_key_file is None else "client_secret_key_file"
        )
        raise ValueError(
            f"CURVE needs both server_public_key_file and client_secret_key_file; "
            f"{missing} is missing"
        )
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE support (zmq.has('curve') is False)")
    server_public, _ = _read(server_public_key_file, "server_public_key_file", want_secret=False)
    client_public, client_secret = _read(
        client_secret_key_file, "client_secret_key_file", want_secret=True
    )
    assert client_secret is not None
    return CurveKeys(server_public, client_public, client_secret)


def keygen(directory: os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public, mode 0644) and ``DIR/NAME.key_secret`` (mode 0600).

    The secret file is never readable by others, not even for an instant: both are written
    in a private temporary directory beside them and linked into place. Existing files are
    never overwritten (FileExistsError). Returns (public path, secret path).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"NAME must be a plain file name stem, got {name!r}")
    target = Path(directory)
    if not target.is_dir():
        raise FileNotFoundError(f"{os.fspath(target)!r} is not a directory")
    public_path, secret_path = target / f"{name}.key", target / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{os.fspath(path)!r} exists; not overwriting a key")
    import zmq.auth

    with tempfile.TemporaryDirectory(dir=target, prefix=".keygen-") as private:  # mode 0700
        public_tmp, secret_tmp = zmq.auth.create_certificates(private, name)
        os.chmod(secret_tmp, 0o600)
        os.chmod(public_tmp, 0o644)
        os.link(secret_tmp, secret_path)
        try:
            os.link(public_tmp, public_path)
        except BaseException:
            os.unlink(secret_path)
            raise
    return public_path, secret_path
