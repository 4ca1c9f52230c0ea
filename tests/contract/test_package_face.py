"""The package face and the import graph: the contract at the bottom, ``attach`` the real one.

``esper_telemetry`` re-exports the wire contract and, on first use, the collector's
``attach``; the contract modules import nothing of the collector or the daemon, and those
two import the contract modules they use directly, never the package face (which would
tie them to whatever the face re-exports and make the contract import them back).
"""

from __future__ import annotations

import ast
import inspect
import pydoc
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import esper_telemetry as et

REPO = Path(__file__).resolve().parents[2]
CONTRACT = sorted(p for p in (REPO / "esper_telemetry").glob("*.py") if p.name != "__init__.py")


def _imports(path: Path):
    """(module, names) of every import statement in ``path``, relative ones made absolute."""
    package = {
        "esper_telemetry": "esper_telemetry",
        "collector": "esper_telemetry.collector",
        "daemon": "esper_telemetry.daemon",
        "integrations": "esper_telemetry.integrations",
        "commands": "esper_telemetry.commands",
    }[path.parent.name]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield base, tuple(a.name for a in node.names)


# The one exception: CURVE certificates are ZeroMQ's own file format, read by both sides;
# certificates.py imports zmq inside its functions only (test_import_isolation checks that
# importing the contract loads no zmq).
_ALSO_ALLOWED = {"certificates.py": {"zmq"}}


def test_contract_modules_import_only_the_standard_library_and_msgpack():
    stdlib = set(sys.stdlib_module_names) | {"msgpack", "esper_telemetry"}
    assert {p.name for p in CONTRACT} >= {
        "events.py",
        "codec.py",
        "defaults.py",
        "version.py",
        "ratio.py",
    }
    for path in CONTRACT:
        allowed = stdlib | _ALSO_ALLOWED.get(path.name, set())
        for module, _ in _imports(path):
            top = module.split(".")[0]
            assert top in allowed, f"{path.name} imports {module}"
            assert not module.startswith(
                (
                    "esper_telemetry.collector",
                    "esper_telemetry.daemon",
                    "esper_telemetry.integrations",
                )
            ), f"{path.name} imports {module}"


# What each folder must never import: the daemon and the collector never each other, the
# trainer integrations (which may use the collector) are imported by neither, and the command
# line (which may use the collector: the demo) is imported by nothing that runs in training
# or in the service; it starts the daemon as a process, never imports it.
_FORBIDDEN = {
    "collector": ("daemon", "integrations", "commands"),
    "daemon": ("collector", "integrations", "commands"),
    "integrations": ("daemon", "commands"),
    "commands": ("daemon", "integrations"),
}


@pytest.mark.parametrize("folder", sorted(_FORBIDDEN))
def test_collector_daemon_and_integrations_import_contract_modules_not_the_face(folder):
    submodules = {p.stem for p in CONTRACT}
    offenders = []
    paths = sorted((REPO / folder).glob("*.py"))
    assert paths, folder
    for path in paths:
        for module, names in _imports(path):
            if module == "esper_telemetry":
                offenders += [
                    f"{path.name}: from esper_telemetry import {n}"
                    for n in names
                    if n not in submodules
                ]
            for other in _FORBIDDEN[folder]:
                if module.startswith(f"esper_telemetry.{other}"):
                    offenders.append(f"{path.name}: imports {module}")
    assert offenders == []


def test_attach_is_the_collectors_own_function():
    pytest.importorskip("torch")  # a daemon-only install has no collector to look at
    from esper_telemetry.collector.api import attach

    assert et.attach is attach
    params = inspect.signature(et.attach).parameters
    assert list(params)[:4] == ["model", "host", "seeds", "groups"]
    assert "optimizer" in params and "endpoint" in params
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    text = pydoc.render_doc(et.attach, renderer=pydoc.plaintext)
    assert "model: " in text and "= None" in text and attach.__doc__.splitlines()[0] in text
    assert et.Telemetry.__module__ == "esper_telemetry.collector.telemetry"
    assert {"attach", "Telemetry"} <= set(dir(et)) and "attach" in et.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        et.nope  # noqa: B018


def test_importing_the_package_loads_neither_collector_nor_torch():
    pytest.importorskip("torch")  # et.attach imports the collector, which needs torch
    code = (
        "import sys, esper_telemetry as et\n"
        "print(sorted(m for m in sys.modules if m.startswith(('esper_telemetry.collector', "
        "'esper_telemetry.daemon', 'torch', 'zmq'))))\n"
        "et.attach\n"
        "print('esper_telemetry.collector.api' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    before, after = proc.stdout.splitlines()
    assert before == "[]" and after == "True"
