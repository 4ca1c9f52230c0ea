"""Fixtures for ``esper-telemetry top``'s tests against a real daemon process."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("prometheus_client")

from live_daemon import LiveDaemon, live_daemon  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LiveDaemon]:
    with live_daemon(tmp_path / "esper-telemetryd.log") as d:
        yield d
