"""The distribution as pip builds and installs it, not the checkout.

One top-level import name (``esper_telemetry``; ``collector`` and ``daemon`` are generic
names other distributions own, python-daemon among them), one version literal, the
license file it declares, the typing marker; installed next to python-daemon both work,
and without the collector extra ``attach`` and the demo say what to install.
"""

from __future__ import annotations

import configparser
import email
import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

import esper_telemetry

REPO = Path(__file__).resolve().parents[2]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "esper_telemetry",
    "collector",
    "daemon",
    "integrations",
    "commands",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (an in-tree build/ could carry stale files)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("esper_telemetry-*.whl")
    return built


def _dist_info(names):
    (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    return info


def test_wheel_installs_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = _dist_info(names)
        top_level = zf.read(f"{info}/top_level.txt").decode().split()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(f"{info}/entry_points.txt").decode())
    assert top_level == ["esper_telemetry"]
    assert sorted({n.split("/")[0] for n in names}) == sorted(["esper_telemetry", info])
    for module in (
        "collector/api.py",
        "collector/telemetry.py",
        "commands/top.py",
        "commands/daemon_process.py",
        "certificates.py",
        "daemon/cli.py",
        "daemon/__main__.py",
        "integrations/__init__.py",
        "integrations/transformers.py",
        "integrations/lightning.py",
        "integrations/peft.py",
        "codec.py",
        "py.typed",
        # The daemon's live page, served from the installed package (no CDN, no network).
        "daemon/page.py",
        "daemon/api.py",
        "daemon/static/index.html",
        "daemon/static/run.html",
        "daemon/static/chart.js",
        "daemon/static/run.js",
        "daemon/static/runs.js",
        "daemon/static/style.css",
        "daemon/static/icon.svg",
    ):
        assert f"esper_telemetry/{module}" in names, module
    assert dict(entry_points["console_scripts"]) == {
        "esper-telemetryd": "esper_telemetry.daemon.cli:main",
        "esper-telemetry": "esper_telemetry.commands.cli:main",
    }


def test_wheel_carries_the_version_and_the_license_it_declares(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = _dist_info(names)
        meta = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
    assert meta["Version"] == esper_telemetry.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert license_text == (REPO / "LICENSE").read_text()
    assert (
        license_text.lstrip().startswith("Apache License\n")
        and "Version 2.0, January 2004" in license_text
    )
    assert "END OF TERMS AND CONDITIONS" in license_text


def test_one_version_literal():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("esper-telemetry") == esper_telemetry.__version__


# -- installed for real, in a scratch environment ----------------------------------------------
def _run(cmd, cwd, timeout=300, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _venv(root: Path, *specs: str) -> Path:
    """A fresh venv under ``root`` with ``specs`` installed one after the other; its bin/."""
    venv.create(root / "env", with_pip=True)
    bin_dir = root / "env" / "bin"
    for spec in specs:
        proc = _run(
            [bin_dir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", spec],
            cwd=root,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return bin_dir


@pytest.fixture
def daemon_only_env(wheel, tmp_path) -> Path:
    """python-daemon first, then esper-telemetry[daemon] (no torch): the order of the report."""
    return _venv(tmp_path, "python-daemon", f"{wheel}[daemon]")


@pytest.mark.slow
def test_installs_next_to_python_daemon_and_both_import(daemon_only_env):
    py = daemon_only_env / "python"
    tmp_path = daemon_only_env.parents[1]
    probe = (
        "import daemon, daemon.daemon, esper_telemetry.daemon.cli, esper_telemetry.codec, sys; "
        "print(daemon.DaemonContext.__module__); print(esper_telemetry.daemon.cli.__file__); "
        "print('torch' in sys.modules)"
    )
    proc = _run([py, "-c", probe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    context_module, cli_file, torch_loaded = proc.stdout.split()
    assert context_module == "daemon.daemon"
    assert Path(cli_file).parts[-3:] == ("esper_telemetry", "daemon", "cli.py")
    assert torch_loaded == "False"
    check = _run([py, "-m", "pip", "check"], cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    # The live page's files come from the installed package (no checkout, no network).
    page = _run(
        [
            py,
            "-c",
            "import importlib.resources as r; from esper_telemetry.daemon.page import Pages; "
            "Pages(lambda run: None, lambda: None); "
            "print(r.files('esper_telemetry.daemon') / 'static' / 'chart.js')",
        ],
        cwd=tmp_path,
    )
    assert page.returncode == 0, page.stderr
    assert "site-packages" in page.stdout and Path(page.stdout.strip()).is_file(), page.stdout
    for cmd in (
        [daemon_only_env / "esper-telemetryd", "--version"],
        [py, "-m", "esper_telemetry.daemon", "--version"],
    ):
        out = _run(cmd, cwd=tmp_path, timeout=60)
        assert out.returncode == 0 and esper_telemetry.__version__ in out.stdout + out.stderr, out

    # Uninstalling ours leaves python-daemon whole.
    gone = _run([py, "-m", "pip", "uninstall", "-y", "-q", "esper-telemetry"], cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    after = _run([py, "-c", "import daemon; print(daemon.DaemonContext.__name__)"], cwd=tmp_path)
    assert after.returncode == 0 and after.stdout.strip() == "DaemonContext", after.stderr


@pytest.mark.slow
def test_without_the_collector_extra_attach_and_demo_name_the_extra(daemon_only_env):
    py = daemon_only_env / "python"
    tmp_path = daemon_only_env.parents[1]
    proc = _run(
        [
            py,
            "-c",
            "import esper_telemetry as et\ntry:\n    et.attach()\n"
            "except ImportError as exc:\n    print(type(exc).__name__, exc.name, exc, sep='|')",
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    kind, name, message = proc.stdout.strip().split("|")
    assert (kind, name) == ("ImportError", "torch")
    assert message == (
        "esper_telemetry.attach needs 'torch', which is not installed: "
        "pip install 'esper-telemetry[collector]'"
    )
    demo = _run(
        [daemon_only_env / "esper-telemetry", "demo", "--steps", "2"], cwd=tmp_path, timeout=60
    )
    assert demo.returncode == 1
    assert demo.stdout == ""
    assert demo.stderr.splitlines() == [
        "esper-telemetry: the demo needs 'torch', which is not installed: "
        "pip install 'esper-telemetry[demo]'"
    ]
    # The PEFT preset says the same; `top` needs no torch at all.
    peft = _run(
        [
            py,
            "-c",
            "import esper_telemetry as et\ntry:\n    et.peft_groups\n"
            "except ImportError as exc:\n    print(exc)",
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert peft.stdout.strip() == (
        "esper_telemetry.peft_groups needs 'torch', which is not installed: "
        "pip install 'esper-telemetry[collector]'"
    ), peft.stderr
    url = "http://127.0.0.1:9/metrics"  # the discard port: nothing listens there
    top = _run(
        [daemon_only_env / "esper-telemetry", "top", "--once", "--url", url],
        cwd=tmp_path,
        timeout=60,
    )
    assert top.returncode == 1 and top.stdout == ""
    assert top.stderr.splitlines() == [
        f"esper-telemetry top: cannot reach {url}: Connection refused"
    ]
