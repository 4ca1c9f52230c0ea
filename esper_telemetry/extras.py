"""Which optional extra provides which imports, and the one message that says to install it.

A daemon-only install has no torch, a training image may lack prometheus-client; either
way the user should read one line naming the extra, not a traceback from deep inside.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_IMPORTS", "install_hint", "missing_extra", "first_missing"]

# The import names each extra of pyproject.toml brings in (beyond msgpack and pyzmq).
EXTRA_IMPORTS = {
    "collector": ("torch",),
    "daemon": ("prometheus_client",),
    "demo": ("torch", "prometheus_client"),
}


def install_hint(what: str, missing: str, extra: str) -> str:
    """One line: ``what`` needs ``missing``, and the pip command that brings it."""
    return (
        f"{what} needs {missing!r}, which is not installed: pip install 'esper-telemetry[{extra}]'"
    )


def missing_extra(exc: ImportError, extra: str, what: str) -> ImportError | None:
    """An ``ImportError`` saying how to install ``extra``, when ``exc`` is about one of its imports.

    ``what`` names the feature that needs it ("esper_telemetry.attach"). None when ``exc``
    is about something else: a real bug, to re-raise as it is.
    """
    missing = (getattr(exc, "name", None) or "").split(".")[0]
    if missing not in EXTRA_IMPORTS[extra]:
        return None
    return ImportError(install_hint(what, missing, extra), name=missing)


def first_missing(extra: str) -> str | None:
    """The first import of ``extra`` this environment cannot find, else None (nothing imported)."""
    for name in EXTRA_IMPORTS[extra]:
        if importlib.util.find_spec(name) is None:
            return name
    return None
