"""The memory guard when the memory is not the connections' (a large state).

Past ``--limits.memory-bytes`` the guard drops the busiest ingest connection, then every
one. If that does not bring the memory back, it must not keep dropping collectors that
reconnect: it acts again only ``REARM_BYTES`` past the level it gave up at. A real TCP
listener and client connections on loopback; the resident memory and the clock are the
test's.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter

from esper_telemetry.daemon.memory import REARM_BYTES, SETTLE_S, MemoryGuard

MiB = 1 << 20


def _connect(port: int, listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = listener.accept()
    return client, server


def test_a_state_past_the_limit_drops_the_collectors_once_then_only_past_a_new_level():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held = [_connect(port, listener) for _ in range(3)]
    shed: Counter = Counter()
    state = {"rss": 900 * MiB, "t": 0.0}
    guard = MemoryGuard(
        768 * MiB,
        [port],
        shed,
        logging.getLogger("test.guard"),
        rss=lambda: state["rss"],
        clock=lambda: state["t"],
    )

    def look(times: int = 1) -> None:
        for _ in range(times):
            state["t"] += SETTLE_S + 0.01
            guard.look()

    try:
        look(2)  # the first look notes who receives; the second drops the busiest
        assert shed == {"connection": 1}
        look()  # still past the limit: every connection
        assert shed == {"connection": 1, "all": 1}
        # The collectors reconnect; the memory stays where it was (it is the state's).
        held += [_connect(port, listener) for _ in range(3)]
        look(20)
        assert shed == {"connection": 1, "all": 1}  # no more drops at that level
        state["rss"] += REARM_BYTES - MiB
        look(20)
        assert shed == {"connection": 1, "all": 1}
        state["rss"] += 2 * MiB  # past the new level: the guard acts again
        look(2)
        assert shed["connection"] == 2
        state["rss"] = 700 * MiB  # back under the limit: armed at the limit again
        look()
        state["rss"] = 800 * MiB
        look(2)
        assert shed["connection"] == 3
    finally:
        for client, server in held:
            client.close()
            server.close()
        listener.close()
