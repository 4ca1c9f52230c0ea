"""CURVE certificates: the one reader and writer of ZeroMQ key files, for both sides.

Keys travel as ZeroMQ certificate files, the format ``zmq.auth.create_certificates`` writes:
``NAME.key`` holds a public key, ``NAME.key_secret`` the public and the secret key. A
collector reads the daemon's ``.key`` and its own ``.key_secret``; the daemon reads its own
``.key_secret`` and a directory of the ``.key`` files of the collectors it admits; operators
write pairs with ``esper-telemetry keygen``.

zmq is imported when a function is called, never at import: the contract package stays
importable where only the standard library and msgpack are (the daemon's config parser and
``keygen`` pull it in only when CURVE is used).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["KeyPair", "read_certificate", "read_public_keys", "write_key_pair"]


class KeyPair(NamedTuple):
    """A Z85 key pair (40 characters each); ``secret`` is None when read from a ``.key``."""

    public: bytes
    secret: bytes | None


def read_certificate(path: os.PathLike | str, *, name: str, secret: bool) -> KeyPair:
    """The keys of one certificate file; ValueError starting with ``name`` says what is wrong.

    ``secret=True`` demands a ``.key_secret`` whose public key is derived from its secret one.
    ``name`` is how the caller's user knows the file (an argument ``server_public_key_file=...``,
    a flag's value): every message starts with it.
    """
    import zmq
    import zmq.auth

    kind = "secret certificate (NAME.key_secret)" if secret else "public certificate (NAME.key)"
    try:
        public, secret_key = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read a ZeroMQ {kind}: {exc}") from None
    if secret and secret_key is None:
        raise ValueError(f"{name} holds no secret key: give a .key_secret file, not a public .key")
    if any(key is not None and len(key) != 40 for key in (public, secret_key)):
        raise ValueError(f"{name}: a key is not 40 Z85 characters")
    if secret_key is not None and zmq.curve_public(secret_key) != public:
        raise ValueError(f"{name}: the public key is not the one derived from the secret key")
    return KeyPair(public, secret_key if secret else None)


def read_public_keys(directory: os.PathLike | str) -> dict[bytes, bool]:
    """The public keys of every ``*.key`` certificate in ``directory``; ValueError if unreadable."""
    if not os.path.isdir(directory):
        raise ValueError(f"{os.fspath(directory)!r} is not a directory")
    return {
        read_certificate(path, name=f"the certificate {str(path)!r}", secret=False).public: True
        for path in sorted(Path(directory).glob("*.key"))
    }


def write_key_pair(directory: os.PathLike | str, name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public, mode 0644) and ``DIR/NAME.key_secret`` (mode 0600).

    ``directory`` is created (mode 0700 for the new levels) when missing. The secret file is
    never readable by others, not even for an instant: both files are written in a private
    temporary directory beside them and linked into place. Existing files are never
    overwritten (FileExistsError). Returns (public path, secret path).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"NAME must be a plain file name stem, got {name!r}")
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{os.fspath(target)!r} is not a directory")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
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
