"""The collector on CUDA where the CPU tests cannot reach: placement masks in each of the four
passes, several dtypes on one device with a seed whose gradient comes and goes, FSDP2 on NCCL,
and torch.compile (inductor, and its CUDA graphs).

Every figure is compared against a float64 reference computed on the CPU from the gradients
as they were at capture time; captures run under sync-debug mode "error" and the collector's
error count is asserted, since it turns internal failures into counts. Skipped cleanly
without CUDA; tools/gpu-check.sh runs them on a lent GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_support import PASSES, HostSeeds, assert_close, no_sync, ref_sq, train_step
from torch import nn

import esper_telemetry as et

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SEEDS = {"a": "seeds.a", "b": "seeds.b"}
# float32 accumulation (Triton blocks of 4,096 squares, or _foreach_norm) of a few thousand
# squares, summed in float64: relative error well below 1e-6; 1e-5 leaves room.
REL = 1e-5


def _norms(pull) -> dict[int, dict[str, et.GroupNorm]]:
    return {
        e.step: {g.name: g for g in e.groups}
        for e in pull.until_goodbyes(timeout_s=10.0)
        if isinstance(e, et.Norms)
    }


@pytest.mark.parametrize("graphs,tables", PASSES)
def test_placement_masks_leave_tensors_out_of_the_sum_not_out_of_the_nonfinite_count(
    attach, pull, graphs, tables
):
    """A rank that is not first along a Replicate dimension adds no squares for those
    tensors (placement.py; the rule itself is tested on gloo meshes). One GPU has no such
    rank, so the mask placement would compute is given to the collector here; what is under
    test is each pass applying it, with zero_grad(set_to_none=True) and a NaN in a tensor
    left out: counted as non-finite, not added to the sum."""
    model = HostSeeds().cuda()
    tel = attach(
        model=model, host=model.host, seeds=SEEDS, cuda_graphs=graphs, pointer_tables=tables
    )
    left_out = {id(model.host[2].weight), id(model.seeds["a"].bias)}
    tel._layout = tel._layout._replace(counted=[id(p) not in left_out for p in tel._flat])
    groups = {"host": model.host, "a": model.seeds["a"], "b": model.seeds["b"]}
    wants, bad = {}, 3
    for i in range(6):
        model.zero_grad(set_to_none=True)
        train_step(model)
        if i == bad:
            model.host[2].weight.grad[0, 0] = float("nan")
        wants[i] = {
            name: ref_sq(p for p in m.parameters() if id(p) not in left_out)
            for name, m in groups.items()
        }
        with no_sync():
            tel.capture(step=i)
    assert tel.flush(10.0)
    stats = tel.stats()
    tel.close()
    assert stats["errors"] == 0 and stats["plans"] == 1
    if graphs and stats["pointer_tables"]:  # one graph whatever the addresses
        assert stats["graph_builds"] == 1 and stats["graph_replays"] == 5
    norms = _norms(pull)
    assert sorted(norms) == list(range(6))
    for step, got in norms.items():
        for name, want in wants[step].items():
            assert math.isfinite(got[name].sq)
            assert_close(got[name].sq, want, REL)
        assert got["host"].nonfinite == (1 if step == bad else 0)
        assert got["a"].nonfinite == 0 and got["b"].nonfinite == 0


class MixedDtypes(nn.Module):
    """A bf16 host, an fp32 seed and an fp16 seed: three dtype buckets on one device."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.host = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.host.to(torch.bfloat16)
        self.seeds = nn.ModuleDict(
            {"a": nn.Linear(width, width), "b": nn.Linear(width, width).to(torch.float16)}
        )

    def forward(self, x, with_b: bool):
        h = self.host(x.to(torch.bfloat16))
        y = h.float() + self.seeds["a"](h.detach().float())
        if with_b:
            y = y + self.seeds["b"](h.detach().half()).float()
        return y.pow(2).mean()


@pytest.mark.parametrize("graphs,tables", PASSES)
def test_several_dtypes_and_a_seed_whose_gradient_comes_and_goes(attach, pull, graphs, tables):
    model = MixedDtypes().cuda()
    tel = attach(
        model=model, host=model.host, seeds=SEEDS, cuda_graphs=graphs, pointer_tables=tables
    )
    modules = {"host": model.host, "a": model.seeds["a"], "b": model.seeds["b"]}
    wants = {}
    for i in range(8):
        model.zero_grad(set_to_none=True)
        model(torch.randn(32, 64, device="cuda"), with_b=i % 2 == 0).backward()
        wants[i] = {
            name: ref_sq(m.parameters()) if (name != "b" or i % 2 == 0) else None
            for name, m in modules.items()
        }
        with no_sync():
            tel.capture(step=i)
    assert tel.flush(10.0)
    stats = tel.stats()
    tel.close()
    assert stats["errors"] == 0 and stats["plans"] == 2  # b present, b absent
    norms = _norms(pull)
    assert sorted(norms) == list(range(8))
    for step, got in norms.items():
        for name, want in wants[step].items():
            if want is None:
                assert got[name].sq is None  # no gradient: no number, not zero
            else:
                assert_close(got[name].sq, want, REL)


def test_fsdp2_on_nccl_with_one_rank(attach, pull, tmp_path):
    """FSDP2 gradients are DTensors (Shard(0) on a mesh of one): measured as local tensors,
    declared sharded, exact against the whole gradient (one rank holds all of it)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("torch.distributed with NCCL is not available")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - torch before 2.6
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available")
    dist.init_process_group(
        "nccl",
        init_method=f"file://{tmp_path / 'pg'}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", torch.cuda.current_device()),
    )
    try:
        model = HostSeeds().cuda()
        # The modules whose forward runs: HostSeeds calls the host's layers one by one.
        for m in (model.host[0], model.host[2], model.seeds["a"], model.seeds["b"]):
            fully_shard(m)
        fully_shard(model)
        tel = attach(model=model, host=model.host, seeds=SEEDS, run="fsdp2")
        wants = {}
        for i in range(3):
            model.zero_grad(set_to_none=True)
            train_step(model)
            assert type(model.host[0].weight.grad).__name__ == "DTensor"
            wants[i] = {
                "host": ref_sq(model.host.parameters()),
                "a": ref_sq(model.seeds["a"].parameters()),
                "b": ref_sq(model.seeds["b"].parameters()),
            }
            with no_sync():
                tel.capture(step=i)
        assert tel.flush(10.0)
        stats = tel.stats()
        tel.close()
    finally:
        dist.destroy_process_group()
    assert stats["errors"] == 0
    norms = _norms(pull)
    assert sorted(norms) == [0, 1, 2]
    for step, got in norms.items():
        for name, want in wants[step].items():
            assert got[name].sharded
            assert_close(got[name].sq, want, REL)


@pytest.fixture
def fresh_dynamo():
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    yield
    dynamo.reset()


def test_capture_inside_an_inductor_compiled_step_on_cuda(attach, pull, fresh_dynamo):
    """Inductor's generated kernels make the gradients; capture() is one graph break."""
    model = HostSeeds().cuda()
    compiled = torch.compile(model)
    tel = attach(model=model, host=model.host, seeds=SEEDS, run="inductor")

    @torch.compile
    def step(x):
        loss = compiled(x).float().pow(2).mean()
        loss.backward()
        tel.capture()
        return loss

    wants = {}
    for i in range(4):
        model.zero_grad(set_to_none=True)
        step(torch.randn(32, 64, device="cuda"))
        wants[i] = ref_sq(model.host.parameters())
    assert tel.flush(10.0)
    stats = tel.stats()
    tel.close()
    assert stats["errors"] == 0
    norms = _norms(pull)
    assert sorted(norms) == [0, 1, 2, 3]
    for step_, got in norms.items():
        assert_close(got["host"].sq, wants[step_], REL)


def test_gradients_of_a_model_compiled_with_cuda_graphs(attach, pull, fresh_dynamo):
    """mode="reduce-overhead": inductor replays CUDA graphs (cudagraph trees) whose outputs,
    the gradients included, live in its own pool and are written again by the next replay.
    The collector holds them until its reads are done; its numbers must be those of the
    step they were captured in."""
    model = HostSeeds().cuda()
    compiled = torch.compile(model, mode="reduce-overhead")
    tel = attach(model=model, host=model.host, seeds=SEEDS, run="cudagraphs")
    wants = {}
    for i in range(6):
        model.zero_grad(set_to_none=True)
        compiled(torch.randn(32, 64, device="cuda")).float().pow(2).mean().backward()
        wants[i] = ref_sq(model.host.parameters())
        with no_sync():
            tel.capture(step=i)
    assert tel.flush(10.0)
    stats = tel.stats()
    tel.close()
    assert stats["errors"] == 0
    norms = _norms(pull)
    assert sorted(norms) == list(range(6))
    for step, got in norms.items():
        assert_close(got["host"].sq, wants[step], REL)
