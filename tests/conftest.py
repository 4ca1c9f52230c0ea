"""Suite-wide guard: what the tests import is the installed ``esper_telemetry``.

The source folders ``collector/``, ``daemon/`` and ``integrations/`` sit at the repository
root but install as ``esper_telemetry.collector``, ``esper_telemetry.daemon`` and
``esper_telemetry.integrations``. With the root on ``sys.path``
(``python -m pytest`` from the root puts it there) a bare ``import daemon`` would find the
folder, and a test could pass on an import no user can make; the suite refuses to start.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _checkout_folder(name: str):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or ())
    for place in places:
        if place and Path(place).resolve().is_relative_to(REPO):
            return place
    return None


def pytest_configure(config: pytest.Config) -> None:
    for name in ("collector", "daemon", "integrations"):
        place = _checkout_folder(name)
        if place is not None:
            raise pytest.UsageError(
                f"a bare `import {name}` finds this checkout's folder ({place}): the repository "
                f"root is on sys.path. Run `pytest` (or `python -P -m pytest`), not "
                f"`python -m pytest` from the root; the package is `esper_telemetry.{name}`."
            )
