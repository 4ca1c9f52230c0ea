"""Signals and startup failures, in-process."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import pytest
import zmq

from daemon.app import Daemon, Signals, StartupError
from daemon_support import make_config


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
        d = Daemon(make_config(zmq_listen_addresses=("tcp://127.0.0.1:*",), web_port=port))
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
