"""The CPU row pass compiled by TorchScript, and as Python where torch cannot compile it.

``norms._rows`` makes three torch calls a large tensor; TorchScript makes them from C++
(``norms._compiled_rows``). Both must give the same bits, no user sees TorchScript's
deprecation warning, and a torch without TorchScript (or a compiled pass that fails) gets
the same figures from Python. The accuracy tests run under both (test_cpu_accuracy.py).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings

import torch

from esper_telemetry.collector import norms
from esper_telemetry.collector.norms import ROW, ROWS_MIN_ELEMENTS, sq_error_bound


def _odd_tensors() -> list[torch.Tensor]:
    """Large float32 tensors with and without tails, views into one buffer at offsets, and
    matrices (one of them a view at an offset)."""
    gen = torch.Generator().manual_seed(7)
    sizes = [ROWS_MIN_ELEMENTS, ROWS_MIN_ELEMENTS + 1, ROWS_MIN_ELEMENTS + ROW - 1, 84_562]
    alone = [torch.randn(n, generator=gen) * 10.0 ** (i - 2) for i, n in enumerate(sizes)]
    flat = torch.randn(sum(sizes) + 5, generator=gen)
    views, at = [], 5
    for n in sizes:
        views.append(flat[at : at + n])
        at += n
    alone[1][-1] = float("nan")  # in a tail
    alone[3][100] = float("inf")  # in a row
    # Weights are matrices: a tail is the last entries of the whole, not of the first dimension.
    matrix = torch.randn(257, 131, generator=gen)  # 65 rows of ROW, a tail of 387
    buffer = torch.randn(257 * 131 + 3, generator=gen)
    in_buffer = buffer[3:].view(257, 131)
    return alone + views + [matrix, in_buffer]


def test_the_compiled_row_pass_gives_the_same_bits_as_python():
    part = _odd_tensors()
    rows = norms._Rows.of(tuple(t.numel() for t in part))
    args = (part, rows.ks, ROW, rows.counts, rows.tails)
    with torch.inference_mode():
        compiled = norms._compiled_rows()(*args)
        python = norms._rows(*args)
    torch.testing.assert_close(compiled, python, rtol=0, atol=0, equal_nan=True)
    want = torch.stack([t.double().square().sum() for t in part])
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(python), finite)
    bound = max(sq_error_bound(t.numel(), torch.float32) for t in part)
    assert ((python[finite] - want[finite]).abs() / want[finite]).max() <= bound


def test_a_torch_without_torchscript_gets_the_row_pass_in_python(monkeypatch, caplog):
    def unavailable(fn):
        raise RuntimeError("TorchScript is not available in this build")

    monkeypatch.setattr(torch.jit, "script", unavailable)
    norms._compile_rows.cache_clear()
    try:
        with caplog.at_level(logging.INFO, "esper_telemetry.collector"):
            assert norms._compiled_rows() is None
        assert "TorchScript unavailable" in caplog.text
        part = _odd_tensors()
        with torch.inference_mode():
            got = norms._rows_squares(part)
        want = torch.stack([t.double().square().sum() for t in part])
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    finally:
        norms._compile_rows.cache_clear()


def test_compiling_the_row_pass_warns_the_user_of_nothing():
    norms._compile_rows.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.jit.script's deprecation would raise here
        assert isinstance(norms._compiled_rows(), torch.jit.ScriptFunction)


def test_a_compiled_pass_that_fails_falls_back_to_python_once(monkeypatch, caplog):
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("interpreter fault")

    monkeypatch.setattr(norms, "_compiled_rows", lambda: broken)
    monkeypatch.setattr(norms, "_SCRIPT_FAILED", [])
    part = _odd_tensors()
    want = torch.stack([t.double().square().sum() for t in part])
    with caplog.at_level(logging.WARNING, "esper_telemetry.collector"), torch.inference_mode():
        first, second = norms._rows_squares(part), norms._rows_squares(part)
    assert len(calls) == 1  # not tried again
    assert caplog.text.count("TorchScript CPU row pass failed") == 1
    for got in (first, second):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        assert ((got[finite] - want[finite]).abs() / want[finite]).max() < 1e-5


def test_threads_compiling_at_once_leave_the_users_warnings_as_they_were(monkeypatch):
    # The training thread and a helper meet the first capture together; catch_warnings swaps
    # the process's filter list, so two threads inside it at once could leave it "ignore".
    real = torch.jit.script
    calls = []

    def slow(fn):
        calls.append(threading.current_thread().name)
        time.sleep(0.05)  # both threads inside catch_warnings at once, were they let in
        return real(fn)

    monkeypatch.setattr(torch.jit, "script", slow)
    norms._compile_rows.cache_clear()
    before = list(warnings.filters)
    start = threading.Barrier(2)
    got = []

    def first_capture():
        start.wait()
        got.append(norms._compiled_rows())

    try:
        threads = [threading.Thread(target=first_capture) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert warnings.filters == before
        assert len(calls) == 1 and got[0] is got[1]
        assert isinstance(got[0], torch.jit.ScriptFunction)
    finally:
        norms._compile_rows.cache_clear()
