"""Fixtures for the trainer integrations: a real daemon process; transformers kept quiet.

The models and data are in tests/support/trainer_support.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("prometheus_client")

from live_daemon import LiveDaemon, live_daemon  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LiveDaemon]:
    with live_daemon(tmp_path / "esper-telemetryd.log") as d:
        yield d


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    # The tiny config's token ids are out of its vocabulary: transformers warns on every build.
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
