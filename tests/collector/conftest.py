"""Fixtures for the collector's CPU tests: a real PULL socket on a random loopback port
(linger 0, bounded receives) and a factory for ``attach`` that always closes what it made."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from collector_support import Receiver, pull_receiver

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
