"""A daemon installed without torch must work: importing the wire contract or the daemon
must not import torch, and the contract alone must not import zmq or prometheus_client.

Each check runs in a fresh interpreter. Besides ``sys.modules`` afterwards, a meta path
finder records every *attempt* to import a forbidden package, so a guarded
``try: import torch`` is caught too, whether or not torch is installed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys

    FORBIDDEN = set(sys.argv[1].split(","))
    attempts = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                attempts.append(name)
            return None  # let the real finders decide

    sys.meta_path.insert(0, Recorder())
    imported, absent = [], []
    for name in sys.argv[2:]:
        optional = name.endswith("?")
        name = name.rstrip("?")
        if optional and importlib.util.find_spec(name) is None:
            absent.append(name)
            continue
        module = importlib.import_module(name)
        imported.append([name, getattr(module, "__file__", None)])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    print(json.dumps({"imported": imported, "absent": absent,
                      "attempts": sorted(set(attempts)), "loaded": loaded}))
    """
)


def probe(forbidden, *modules, path=None):
    """Import ``modules`` (a trailing ``?``: only if ``find_spec`` finds it) in a fresh
    interpreter run outside the checkout (``-c`` puts the working directory on sys.path),
    so what it imports is what the environment installs; report what it imported and tried."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(forbidden), *modules],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_from_repo(report, name):
    files = dict(report["imported"])
    assert name in files, report
    # The checkout's package, not some other installed copy.
    assert Path(files[name]).resolve().is_relative_to(REPO), files[name]


def test_wire_contract_imports_no_torch_zmq_or_prometheus():
    report = probe(["torch", "zmq", "prometheus_client"], "esper_telemetry")
    assert_from_repo(report, "esper_telemetry")
    assert report["attempts"] == [], report
    assert report["loaded"] == [], report


def test_wire_contract_submodules_import_no_torch_zmq_or_prometheus():
    report = probe(
        ["torch", "zmq", "prometheus_client"],
        "esper_telemetry.events",
        "esper_telemetry.codec",
        "esper_telemetry.defaults",
        "esper_telemetry.version",
    )
    assert len(report["imported"]) == 4, report
    assert report["attempts"] == [] and report["loaded"] == [], report


def test_contract_and_daemon_import_no_torch():
    report = probe(["torch"], "esper_telemetry", "esper_telemetry.daemon")
    assert_from_repo(report, "esper_telemetry")
    assert_from_repo(report, "esper_telemetry.daemon")
    assert report["attempts"] == [], report
    assert report["loaded"] == [], report


def test_daemon_cli_imports_no_torch():
    report = probe(["torch"], "esper_telemetry", "esper_telemetry.daemon.cli")
    assert_from_repo(report, "esper_telemetry.daemon.cli")
    assert report["attempts"] == [], report
    assert report["loaded"] == [], report


def test_the_probe_sees_a_guarded_import(tmp_path):
    # The recorder must catch an attempt even when it fails and is swallowed: otherwise
    # the tests above would pass for a package that tries torch on a machine without it.
    (tmp_path / "esper_probe_guarded.py").write_text(
        "try:\n    import esper_no_such_pkg.sub\nexcept ImportError:\n    pass\n"
    )
    report = probe(["esper_no_such_pkg"], "esper_probe_guarded", path=tmp_path)
    assert [name for name, _ in report["imported"]] == ["esper_probe_guarded"]
    assert report["attempts"] == ["esper_no_such_pkg"], report
    assert report["loaded"] == [], report
    clean = probe(["esper_no_such_pkg"], "json")
    assert clean["imported"] and clean["attempts"] == [], clean
