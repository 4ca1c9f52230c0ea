"""The CPU pass's accuracy does not depend on which of its code paths the CPU selects.

The README's bound holds "on any CPU", but a CI box is an Intel Xeon one day and an AMD EPYC
the next, and the two run different code: oneMKL (inside torch's CPU wheel) picks its
branch by vendor, not only by instruction set, so an AMD CPU with AVX2 runs a generic
``dot`` and an Intel one its AVX2 ``dot`` (their float32 sums of 32,768 equal entries differ
from the exact one by 1.35e-5 and 4.3e-6 on one AMD EPYC); torch picks its own kernels by
instruction set. This file runs the accuracy tests again, in a fresh process, on the paths
this box would not take by itself:

- MKL's Intel branch: a preloaded library answers MKL's vendor question with "Intel" (two
  exported functions of torch's MKL). MKL's own report of the branch (``MKL_VERBOSE``) must
  name the instruction set, which its generic branch does not; on an Intel CPU that is what
  it runs anyway.
- torch's portable kernels (``ATEN_CPU_CAPABILITY=default``), in place of AVX2 or AVX-512.

Lanes of 16 (AVX-512) cannot be run on a CPU without AVX-512; the bound covers them
(``norms.sq_error_bound``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent

ACCURACY_TESTS = [
    str(HERE / "test_cpu_accuracy.py"),
    str(HERE / "test_cpu_row_pass.py"),
    str(HERE / "test_cpu_pass.py"),
    str(HERE / "test_norms_correctness.py"),
]

# oneMKL asks these two whether the CPU is Intel's before it picks a branch.
_INTEL_ANSWER = """\
int mkl_serv_intel_cpu(void) { return 1; }
int mkl_serv_intel_cpu_true(void) { return 1; }
"""

# One float64 dot, large enough for MKL to report the branch it runs.
_MKL_PROBE = "import torch; a = torch.ones(100_000, dtype=torch.float64); torch.dot(a, a)"


def _mkl_branch(env: dict[str, str]) -> str:
    """The processor line MKL_VERBOSE prints for a dot in a process with ``env``."""
    result = subprocess.run(
        [sys.executable, "-c", _MKL_PROBE],
        env={**env, "MKL_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in result.stdout.splitlines() if "MKL_VERBOSE oneMKL" in line]
    assert lines, f"MKL reported no branch: {result.stdout[-2000:]!r}"
    return lines[0]


def _intel_answer_library(tmp_path: Path) -> Path:
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the preloaded library")
    source = tmp_path / "intel_answer.c"
    source.write_text(_INTEL_ANSWER)
    library = tmp_path / "libintel_answer.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60
    )
    return library


def _run_accuracy_tests(env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *ACCURACY_TESTS],
        env=env,
        cwd=HERE.parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary
    return summary


def test_the_accuracy_tests_pass_on_mkls_intel_branch(tmp_path):
    library = _intel_answer_library(tmp_path)
    env = {**os.environ, "LD_PRELOAD": str(library)}
    branch = _mkl_branch(env)
    if "Advanced Vector Extensions" not in branch:
        pytest.skip(f"MKL of this torch did not take the answer: {branch}")
    _run_accuracy_tests(env)


def test_the_accuracy_tests_pass_on_torchs_portable_kernels():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    capability = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert capability == "DEFAULT", capability
    _run_accuracy_tests(env)
