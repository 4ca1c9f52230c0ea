"""Fixtures for the collector's CPU tests: a real PULL socket on a random loopback port
(linger 0, bounded receives), a factory for ``attach`` that always closes what it made, and
a real daemon process per test module for the gloo layout tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from collector_support import Receiver, pull_receiver
from live_daemon import LiveDaemon, live_daemon

import esper_telemetry as et


@pytest.fixture
def pull() -> Iterator[Receiver]:
    with pull_receiver() as receiver:
        yield receiver


@pytest.fixture
def attach(pull: Receiver, request) -> Iterator[Any]:
    """``attach(**kw)`` publishing to ``pull`` under run id "test" unless told otherwise."""
    made: list[Any] = []

    def _attach(**kw: Any) -> Any:
        kw.setdefault("endpoint", pull.endpoint)
        kw.setdefault("run", "test")
        tel = et.attach(**kw)
        made.append(tel)
        return tel

    yield _attach
    for tel in made:
        tel.close(timeout_s=2.0)


@pytest.fixture
def thread_names():
    """Names of the live threads, for checking that nothing was started or left behind."""
    return lambda: sorted(t.name for t in threading.enumerate())


@pytest.fixture(scope="module")
def daemon(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    """A real daemon process the module's rank runs publish to (its log in a temp folder)."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    with live_daemon(tmp_path_factory.mktemp(name) / "esper-telemetryd.log") as d:
        yield d
