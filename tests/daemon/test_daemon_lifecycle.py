"""Signals and startup failures, in-process."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import pytest
import zmq
from daemon_support import make_config

from esper_telemetry.daemon.app import Daemon, Signals, StartupError
from esper_telemetry.daemon.config import WebAddress


def test_first_signal_requests_a_graceful_stop_and_the_second_forces_exit():
    exits = []
    stop = asyncio.Event()
    handler = Signals(stop, force_exit=exits.append, logger=logging.getLogger("test"))
    handler(signal.SIGTERM)
    assert stop.is_set() and exits == []
    handler(signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


async def test_web_port_in_use_is_a_startup_error_and_releases_the_zmq_socket():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        d = Daemon(
            make_config(
                zmq_listen_addresses=("tcp://127.0.0.1:*",),
                web_listen_address=WebAddress("127.0.0.1", port),
            )
        )
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await d.start()
        assert d.receiver._sockets == [] and not d.ready()
    finally:
        busy.close()


async def test_zmq_address_in_use_is_a_startup_error_naming_the_endpoint():
    ctx = zmq.Context()
    holder = ctx.socket(zmq.PULL)
    holder.setsockopt(zmq.LINGER, 0)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    try:
        d = Daemon(make_config(zmq_listen_addresses=(f"tcp://127.0.0.1:{port}",)))
        with pytest.raises(StartupError, match=f"cannot bind tcp://127.0.0.1:{port}"):
            await d.start()
    finally:
        holder.close(linger=0)
        ctx.term()


async def test_an_unresolvable_web_host_is_a_startup_error_and_releases_the_zmq_socket():
    # "foo..bar" fails in the IDNA codec (UnicodeError), not with an OSError.
    d = Daemon(make_config(web_listen_address=WebAddress("foo..bar", 0)))
    try:
        with pytest.raises(StartupError, match="cannot listen on foo..bar:0"):
            await d.start()
        assert d.receiver._sockets == [] and not d.ready()
    finally:  # without the fix a leaked socket would hang the context's term() at exit
        d.receiver.close()
        d._context.destroy(linger=0)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_an_ipv6_zmq_listen_address_binds_and_ingests():
    # The configuration accepts tcp://[ADDR]:PORT; libzmq binds it only with ZMQ_IPV6 set.
    from daemon_support import host_seed, wait_for

    from esper_telemetry import encode

    d = Daemon(make_config(zmq_listen_addresses=("tcp://[::1]:*",)))
    await d.start()
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.IPV6, 1)
        push.connect(d.receiver.endpoints[0])
        push.send(encode(host_seed(host_sq=4.0)))
        await wait_for(lambda: d.stats.events == 1, 10, "the event over IPv6")
        push.close(linger=0)
    finally:
        await d.shutdown()
        ctx.term()
