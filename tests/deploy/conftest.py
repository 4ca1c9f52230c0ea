"""Fixtures for the deploy tests: one real daemon per session, and its exposition."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_support import Daemon, exposition_names, sample, sample_events, send_events, wait_until


@pytest.fixture(scope="session")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="session")
def exposition(daemon: Daemon) -> dict[str, object]:
    """The daemon's real /metrics after a run sent every kind of event (and one bad frame)."""
    send_events(daemon.endpoint, sample_events("expo"), raw=[b"\xc1 not msgpack"])

    def ready() -> str | None:
        text = daemon.metrics()
        ok = (
            sample(text, "esper_grad_norm", run="expo", group="host") == 2.0
            and sample(text, "esper_collector_dropped_events_total", run="expo") == 2.0
            and sample(text, "esper_device_mismatch_total", run="expo", kind="split") == 1.0
        )
        return text if ok else None

    text = wait_until(ready, 10, "the daemon to export the test run")
    return {"text": text, "names": exposition_names(text)}
