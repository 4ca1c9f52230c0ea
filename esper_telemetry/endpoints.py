"""ZeroMQ endpoint syntax, checked the same way by the collector (connect) and the daemon (bind).

libzmq reports a bad endpoint late and vaguely (``Invalid argument`` from ``connect``, or a
socket that silently never connects, as with ``localhost:5569``); both sides refuse one
at configuration time instead, with the text that was given.
"""

from __future__ import annotations

import re

__all__ = ["check_endpoint"]

_TCP = re.compile(r"^tcp://(?P<host>\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\*|\d+)$")


def check_endpoint(addr: str, *, bind: bool, inproc: bool = False) -> str:
    """``addr`` when it is ``tcp://HOST:PORT`` or ``ipc://PATH`` (and ``inproc://NAME`` if allowed).

    ``bind``: a listening side may use ``*`` for the host or the port (any interface, a
    random port) and port 0; a connecting side needs a host and a port in 1..65535.
    Raises ``ValueError`` quoting ``addr`` and saying what is accepted.
    """
    if not isinstance(addr, str):
        raise TypeError(f"an endpoint is a string, got {type(addr).__name__}")
    accepted = "tcp://HOST:PORT, ipc://PATH" + (" or inproc://NAME" if inproc else "")
    for scheme in ("ipc://", "inproc://") if inproc else ("ipc://",):
        if addr.startswith(scheme):
            if len(addr) == len(scheme):
                raise ValueError(f"{addr!r} has no {'path' if scheme == 'ipc://' else 'name'}")
            return addr
    m = _TCP.match(addr)
    if m is None:
        raise ValueError(f"{addr!r} is not {accepted}")
    if not bind and "*" in (m["host"], m["port"]):
        raise ValueError(
            f"{addr!r}: '*' is for listening; a collector connects to one host and port"
        )
    if m["port"] != "*":
        low = 0 if bind else 1
        if not low <= int(m["port"]) <= 65535:
            raise ValueError(f"port out of range in {addr!r} (must be {low}..65535)")
    return addr
