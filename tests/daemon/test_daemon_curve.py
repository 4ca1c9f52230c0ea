"""CURVE on the ingest sockets (daemon.curve): who gets in, what is counted, key reloads.

Real ZeroMQ sockets on loopback: a CURVE PULL socket behind pyzmq's asyncio ZAP handler,
and PUSH clients with no CURVE, an unknown key, a wrong daemon key, and an authorized key.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from esper_telemetry.certificates import write_key_pair
from esper_telemetry.daemon.curve import CurveGate, read_public_keys, read_server_keys


@pytest.fixture
def keys(tmp_path) -> Path:
    store, authorized = tmp_path / "keys", tmp_path / "authorized"
    store.mkdir()
    authorized.mkdir()
    for name in ("daemon", "good", "stranger", "late"):
        write_key_pair(store, name)
    shutil.copy(store / "good.key", authorized / "good.key")
    return tmp_path


def client(
    ctx: zmq.Context, endpoint: str, keys: Path, name: str | None, server: str = "daemon"
) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    if name is not None:
        public, secret = zmq.auth.load_certificate(str(keys / "keys" / f"{name}.key_secret"))
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = zmq.auth.load_certificate(str(keys / "keys" / f"{server}.key"))[0]
    sock.connect(endpoint)
    return sock


class Server:
    def __init__(self, keys: Path, authorized: Path | None, poll_s: float = 0.1) -> None:
        self.ctx = zmq.asyncio.Context()
        self.gate = CurveGate(
            self.ctx,
            read_server_keys(str(keys / "keys" / "daemon.key_secret")),
            None if authorized is None else str(authorized),
            logging.getLogger("test.curve"),
            poll_interval_s=poll_s,
        )
        self.gate.start()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.linger = 0
        self.gate.secure(self.sock)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def received(self, wait_s: float) -> list[bytes]:
        got = []
        deadline = asyncio.get_running_loop().time() + wait_s
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                got.append(await asyncio.wait_for(self.sock.recv(), left))
            except asyncio.TimeoutError:
                break
        return got

    def close(self) -> None:
        self.gate.close()
        self.sock.close(linger=0)
        self.ctx.term()


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_only_authorized_keys_get_in_and_every_refusal_is_counted(keys) -> None:
    server = Server(keys, keys / "authorized")
    ctx = zmq.Context()
    try:
        senders = {
            name: client(ctx, server.endpoint, keys, name) for name in (None, "stranger", "good")
        }
        senders["wrong daemon key"] = client(ctx, server.endpoint, keys, "good", server="stranger")
        for name, sock in senders.items():
            sock.send(f"from {name}".encode())  # queued until (if ever) the handshake succeeds
        denied = server.gate.denied
        # The plain peer is counted as no_curve when libzmq reports the mechanism mismatch,
        # as handshake when the connection drops first; the wrong daemon key as handshake.
        await until(
            lambda: (
                denied["unknown_key"] > 0 and denied["handshake"] > 0 and sum(denied.values()) >= 3
            )
        )
        assert await server.received(1.0) == [b"from good"]
        assert server.gate.authorized == 1
    finally:
        for sock in senders.values():
            sock.close()
        ctx.term()
        server.close()


async def test_without_a_directory_any_curve_client_that_knows_the_daemon_key_gets_in(keys) -> None:
    server = Server(keys, None)
    ctx = zmq.Context()
    try:
        stranger = client(ctx, server.endpoint, keys, "stranger")
        plain = client(ctx, server.endpoint, keys, None)
        stranger.send(b"stranger")
        plain.send(b"plain")
        # The only refused peer is the plain one (see above for its two reasons).
        await until(lambda: server.gate.denied["no_curve"] + server.gate.denied["handshake"] > 0)
        assert await server.received(1.0) == [b"stranger"]
        assert server.gate.denied["unknown_key"] == 0
    finally:
        stranger.close()
        plain.close()
        ctx.term()
        server.close()


async def test_a_key_added_to_the_directory_is_admitted_without_a_restart(keys) -> None:
    server = Server(keys, keys / "authorized", poll_s=0.1)
    ctx = zmq.Context()
    senders = []
    try:
        senders.append(client(ctx, server.endpoint, keys, "late"))
        senders[-1].send(b"refused")
        await until(lambda: server.gate.denied["unknown_key"] > 0)
        assert await server.received(0.3) == []
        shutil.copy(keys / "keys" / "late.key", keys / "authorized" / "late.key")
        await until(lambda: server.gate.authorized == 2)
        # libzmq does not retry a connection refused for its key: the collector's next
        # connection (its next attach) gets in, with no restart of the daemon.
        senders.append(client(ctx, server.endpoint, keys, "late"))
        senders[-1].send(b"admitted")
        assert await server.received(2.0) == [b"admitted"]
        # Removing it takes it out again (SIGHUP calls the same reload).
        (keys / "authorized" / "late.key").unlink()
        assert server.gate.reload("SIGHUP") and server.gate.authorized == 1
        refused = server.gate.denied["unknown_key"]
        senders.append(client(ctx, server.endpoint, keys, "late"))
        senders[-1].send(b"refused again")
        await until(lambda: server.gate.denied["unknown_key"] > refused)
        assert await server.received(0.3) == []
    finally:
        for sock in senders:
            sock.close()
        ctx.term()
        server.close()


async def test_an_unreadable_directory_keeps_the_keys_loaded(keys, caplog) -> None:
    server = Server(keys, keys / "authorized")
    try:
        (keys / "authorized" / "broken.key").write_text("not a certificate\n")
        with caplog.at_level(logging.ERROR, logger="test.curve"):
            assert server.gate.reload("SIGHUP") is False
        assert server.gate.authorized == 1
        assert "keeping the 1 loaded" in caplog.text and "broken.key" in caplog.text
    finally:
        server.close()


def test_server_keys_must_be_a_secret_certificate(keys) -> None:
    with pytest.raises(ValueError, match="holds no secret key"):
        read_server_keys(str(keys / "keys" / "daemon.key"))
    with pytest.raises(ValueError, match="cannot read"):
        read_server_keys(str(keys / "nope.key_secret"))
    with pytest.raises(ValueError, match="not a directory"):
        read_public_keys(str(keys / "nope"))
    assert len(read_public_keys(str(keys / "authorized"))) == 1
