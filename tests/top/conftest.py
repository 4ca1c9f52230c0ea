"""Fixtures for ``esper-telemetry top``'s tests against a real daemon process."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("prometheus_client")

from live_daemon import LiveDaemon  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LiveDaemon]:
    d = LiveDaemon(tmp_path / "esper-telemetryd.log")
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, f"esper-telemetryd exited with {code}:\n{d.log()}"
