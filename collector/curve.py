"""CURVE keys for the collector's socket, read once at attach.

A collector needs the daemon's public key (the server's ``.key``) and its own secret
certificate (a client's ``.key_secret``); the daemon admits the client when the client's
``.key`` is in its authorized-keys directory. The files are read by the one certificate
reader both sides share (``esper_telemetry.certificates``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from esper_telemetry.certificates import KeyPair, read_certificate

__all__ = ["CurveKeys", "load_client_keys"]


class CurveKeys(NamedTuple):
    """What a CURVE client socket is given: the daemon's public key and the client's pair."""

    server_public: bytes
    client: KeyPair


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
    import zmq

    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE support (zmq.has('curve') is False)")
    server = read_certificate(
        server_public_key_file,
        name=f"server_public_key_file={os.fspath(server_public_key_file)!r}",
        secret=False,
    )
    client = read_certificate(
        client_secret_key_file,
        name=f"client_secret_key_file={os.fspath(client_secret_key_file)!r}",
        secret=True,
    )
    return CurveKeys(server.public, client)
