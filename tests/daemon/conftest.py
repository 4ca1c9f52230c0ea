"""Fixtures for the daemon's tests: aggregators and a fake clock and in-process daemons on
random loopback ports, always shut down; PUSH sockets with linger 0."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import zmq
from daemon_support import FakeClock, http_get, make_config, make_limits, parse

from esper_telemetry.daemon.aggregator import Aggregator
from esper_telemetry.daemon.app import Daemon
from esper_telemetry.daemon.stats import DaemonStats


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_agg() -> Callable[..., tuple[Aggregator, DaemonStats]]:
    """An aggregator on the default limits but ``overrides``, and its stats. Time is
    whatever each test passes as ``now`` (usually the ``clock`` fixture's)."""

    def make(**overrides: Any) -> tuple[Aggregator, DaemonStats]:
        stats = DaemonStats()
        agg = Aggregator(make_limits(**overrides), stats, logging.getLogger("test.aggregator"))
        return agg, stats

    return make


class Running:
    """An in-process daemon and helpers to talk to it."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.endpoint = daemon.receiver.endpoints[0]
        self.base = f"http://{daemon.web_address}"

    async def scrape(self) -> dict:
        status, body, _ = await asyncio.to_thread(
            http_get, self.base + self.daemon.config.telemetry_path
        )
        assert status == 200
        return parse(body)

    async def get(self, path: str) -> tuple[int, str, dict]:
        return await asyncio.to_thread(http_get, self.base + path)


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Any]]:
    started: list[Daemon] = []

    async def start(process_metrics: bool = True, **overrides: Any) -> Running:
        d = Daemon(
            make_config(**overrides),
            logger=logging.getLogger("test.daemon"),
            process_metrics=process_metrics,
        )
        await d.start()
        started.append(d)
        return Running(d)

    yield start
    for d in started:
        await d.shutdown()


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def push(zctx: zmq.Context) -> Callable[[str], zmq.Socket]:
    keep: list[zmq.Socket] = []  # a collected socket closes with linger 0, losing messages

    def make(endpoint: str) -> zmq.Socket:
        sock = zctx.socket(zmq.PUSH)
        keep.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 5000)  # a send never blocks a test for long
        sock.connect(endpoint)
        return sock

    return make
