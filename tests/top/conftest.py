"""Fixtures for ``esper-telemetry top``'s tests against a real daemon process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from live_daemon import LiveDaemon, live_daemon  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LiveDaemon]:
    with live_daemon(tmp_path / "esper-telemetryd.log") as d:
        yield d
