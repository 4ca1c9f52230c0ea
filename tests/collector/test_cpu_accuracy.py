"""The CPU pass is as accurate as ``norms.sq_error_bound`` says, on any CPU.

Large tensors used to go to ``torch.dot``, whose float32 sum order is the BLAS's: on an AMD
EPYC, MKL's was 1.2e-5 off at 32,768 equal entries (the bound the README promised was
1e-5) and 2e-4 at a million. Equal entries are the hard case for a float32 sum (every
addition rounds the same way); each case here is compared with a float64 reference, the
tolerance being the bound for that tensor, which no longer depends on the BLAS.

Every test here runs twice: with the row pass compiled by TorchScript (as it runs where
torch has it) and as Python (where it has not); each within the bound (test_cpu_row_pass.py
holds the two to the same bits).
"""

from __future__ import annotations

import math

import pytest
import torch
from collector_support import rel_err
from torch import nn

from esper_telemetry.collector import norms
from esper_telemetry.collector.norms import ROW, ROWS_MIN_ELEMENTS, sq_error_bound


@pytest.fixture(autouse=True, params=["compiled", "python"])
def row_pass(request, monkeypatch):
    """The row pass as TorchScript, or as Python (``_compiled_rows`` gives None)."""
    monkeypatch.setattr(norms, "_SCRIPT_FAILED", [])
    if request.param == "python":
        monkeypatch.setattr(norms, "_compiled_rows", lambda: None)
    else:
        assert isinstance(norms._compiled_rows(), torch.jit.ScriptFunction)
    yield request.param
    assert not norms._SCRIPT_FAILED  # the compiled pass ran, not Python after its failure


def _model(grad: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.host = nn.ParameterList([nn.Parameter(torch.zeros_like(grad))])
    model.seed = nn.ParameterList([nn.Parameter(torch.zeros(3))])
    model.host[0].grad = grad
    model.seed[0].grad = torch.ones(3)
    return model


def _measured(attach, grad: torch.Tensor):
    model = _model(grad)
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    tel.capture(step=0)
    assert tel.flush(5.0)
    assert tel.stats()["errors"] == 0
    return tel.latest().groups["host"]


def _fill(kind: str, n: int) -> torch.Tensor:
    if kind == "equal":
        return torch.full((n,), 1 / 3)
    gen = torch.Generator().manual_seed(n)
    # gradients span orders of magnitude: mixed signs, scales from 1e-3 to 1e3
    scale = torch.exp((torch.randn(n, generator=gen) * 2.3).clamp(-6.9, 6.9))
    return torch.randn(n, generator=gen) * scale  # within float16's range


@pytest.mark.parametrize("kind", ["equal", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [ROWS_MIN_ELEMENTS, ROWS_MIN_ELEMENTS + 77, (1 << 20) + 3])
def test_large_tensors_are_within_the_bound(attach, kind, dtype, n):
    grad = _fill(kind, n).to(dtype)
    want = float(grad.double().pow(2).sum())
    host = _measured(attach, grad)
    bound = sq_error_bound(n, dtype) + 2.0**-53
    assert rel_err(host.sq, want) <= bound, (host.sq, want, bound)
    if dtype != torch.float64:  # the README: large float32 gradients' norms within 1e-5
        assert bound / 2 < 1e-5


def test_the_bound_of_large_tensors_does_not_grow_with_their_size():
    small, big = (
        sq_error_bound(ROWS_MIN_ELEMENTS, torch.float32),
        sq_error_bound(1 << 30, torch.float32),
    )
    assert big < 1.01 * small < 2e-5  # squares: norms within 1e-5
    # below the large-run size, one _foreach_norm: the any-order bound of its length
    assert sq_error_bound(1000, torch.float32) == pytest.approx(1002 * 2.0**-24, rel=1e-3)


@pytest.mark.parametrize("shape", [(ROWS_MIN_ELEMENTS + ROW - 1,), (257, 131)])
def test_the_tail_past_the_last_full_row_is_counted(attach, shape):
    grad = torch.full(shape, 1e-3)
    n = grad.numel()
    grad.view(-1)[-(n % ROW) :] = 1e3  # all of the weight is in the tail (of the whole matrix)
    host = _measured(attach, grad)
    assert rel_err(host.sq, float(grad.double().pow(2).sum())) <= sq_error_bound(n, grad.dtype)


@pytest.mark.parametrize("where", ["row", "tail"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e19])
def test_a_non_finite_entry_in_a_row_or_the_tail_is_counted(attach, where, bad):
    n = ROWS_MIN_ELEMENTS + 5
    grad = torch.ones(n)
    grad[7 if where == "row" else -2] = bad  # 3e19 squared is past float32's range
    host = _measured(attach, grad)
    assert host.nonfinite == 1 and not math.isfinite(host.sq)


def test_a_non_contiguous_large_gradient_is_read_whole(attach):
    grad = _fill("mixed", 256 * 160).reshape(256, 160).t()  # dense, not contiguous
    assert not grad.is_contiguous()
    host = _measured(attach, grad)
    want = float(grad.double().pow(2).sum())
    assert rel_err(host.sq, want) <= sq_error_bound(grad.numel(), grad.dtype)


def test_gradients_that_are_views_into_one_buffer_are_read_where_they_lie(attach):
    # DDP's gradient_as_bucket_view, flat-parameter wrappers: each gradient is a view at an
    # offset into one buffer, so rows and tails must be read from the view's own offset.
    sizes = [ROWS_MIN_ELEMENTS + 77, ROWS_MIN_ELEMENTS, ROWS_MIN_ELEMENTS + ROW - 1]
    flat = torch.full((sum(sizes) + 11,), 1e-3)
    views, at = [], 11
    for n in sizes:
        view = flat[at : at + n]
        view[-(n % ROW) or n - 1 :] = 1e3  # the weight sits in each tail (the last entry: none)
        views.append(view)
        at += n
    model = nn.Module()
    model.host = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in sizes[:2]])
    model.seed = nn.ParameterList([nn.Parameter(torch.zeros(sizes[2]))])
    for p, g in zip([*model.host, *model.seed], views):
        p.grad = g
    tel = attach(model=model, host="host", seeds={"s": "seed"})
    tel.capture(step=0)
    assert tel.flush(5.0) and tel.stats()["errors"] == 0
    got = tel.latest().groups
    for name, grads in (("host", views[:2]), ("s", views[2:])):
        want = sum(float(g.double().pow(2).sum()) for g in grads)
        bound = max(sq_error_bound(g.numel(), g.dtype) for g in grads) + 2 * 2.0**-53
        assert rel_err(got[name].sq, want) <= bound, (name, got[name].sq, want)
