"""Two processes on the CPU with gloo and DDP: each rank reports its rank and world size
from torch.distributed, and both ranks' norms are the all-reduced gradient's, equal to the
float64 reference; a rank cannot see that, so its groups are local (``sharded``) and carry
equal fingerprints, which the daemon counts once. A DTensor-sharded group is measured on
each rank's shard, with a fingerprint per shard; the shards' squares add up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from collector_support import REPO, free_port, rel_err, subprocess_env

from esper_telemetry import Goodbye, Hello, Norms

pytestmark = pytest.mark.slow

_RANK_SCRIPT = textwrap.dedent("""
    import copy, json, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import esper_telemetry as et
    from collector_support import make_model, ref_sq

    rank, port, endpoint = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = make_model(seed=0)
    local = copy.deepcopy(model)
    ddp = DDP(model)
    # A row-sharded parameter (tensor parallel style): each rank holds half of the rows.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(5)
    full_w, full_g = torch.randn(6, 3), torch.randn(6, 3)
    tp = torch.nn.Parameter(distribute_tensor(full_w, mesh, [Shard(0)]))
    tp.grad = distribute_tensor(full_g, mesh, [Shard(0)])
    tel = et.attach(model=model, host="host", seeds={"a": "seeds.a", "b": "seeds.b"},
                    groups={"tp": [tp]}, endpoint=endpoint, run="ddp")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(100 + rank))
    ddp(x).backward()
    local(x).backward()                      # this rank's gradient before the all-reduce
    tel.capture(step=0)
    assert tel.flush(10.0)
    res = tel.latest()
    groups = {"host": model.host, "a": model.seeds["a"], "b": model.seeds["b"]}
    print(json.dumps({
        "rank": tel.rank, "world": tel.world_size,
        "sq": {n: g.sq for n, g in res.groups.items()},
        "sharded": {n: g.sharded for n, g in res.groups.items()},
        "ref": {n: ref_sq(m.parameters()) for n, m in groups.items()},
        "local": {"host": ref_sq(local.host.parameters())},
        "tp": {"sq": res.groups["tp"].sq, "params": res.groups["tp"].params,
               "local_ref": float(tp.grad.to_local().double().pow(2).sum()),
               "full_ref": float(full_g.double().pow(2).sum())},
    }), flush=True)
    tel.close()
    dist.destroy_process_group()
""")


def _two_ranks(tmp_path, source: str, endpoint: str, timeout_s: float) -> list[dict]:
    """``source`` run as ranks 0 and 1 of a gloo group; each one's last line, as JSON."""
    script = tmp_path / "rank.py"
    script.write_text(source)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(port), endpoint],
            cwd=str(REPO),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def test_ddp_two_ranks_report_replicated_norms(tmp_path, pull):
    outs = _two_ranks(tmp_path, _RANK_SCRIPT, pull.endpoint, timeout_s=60)
    r0, r1 = outs
    assert (r0["rank"], r0["world"], r1["rank"], r1["world"]) == (0, 2, 1, 2)
    # The sharded group: each rank measures its own shard, and the shards add up.
    for r in (r0, r1):
        assert r["sharded"]["tp"] is True and r["tp"]["params"] == 18
        assert rel_err(r["tp"]["sq"], r["tp"]["local_ref"]) <= 1e-5
    assert rel_err(r0["tp"]["sq"] + r1["tp"]["sq"], r0["tp"]["full_ref"]) <= 1e-5
    assert rel_err(r0["tp"]["sq"], r1["tp"]["sq"]) > 1e-3  # really different shards
    for name in ("host", "a", "b"):
        assert rel_err(r0["sq"][name], r0["ref"][name]) <= 1e-5
        assert rel_err(r1["sq"][name], r1["ref"][name]) <= 1e-5
        assert rel_err(r0["sq"][name], r1["sq"][name]) <= 1e-6  # replicated gradient
        # A rank cannot see that the others hold the same (DDP): its value is local, and
        # the daemon counts the ranks by fingerprint (equal here: one replica counted).
        assert r0["sharded"][name] is True and r1["sharded"][name] is True
    # The inputs differ per rank, so the all-reduce changed the gradient: it was captured after it.
    assert rel_err(r0["ref"]["host"], r0["local"]["host"]) > 1e-3
    events = pull.until_goodbyes(2, timeout_s=10.0)
    hellos = sorted((e.rank, e.world_size, e.run) for e in events if isinstance(e, Hello))
    assert hellos == [(0, 2, "ddp"), (1, 2, "ddp")]
    norms = {e.rank: e for e in events if isinstance(e, Norms)}
    assert sorted(norms) == [0, 1]
    for rank, n in norms.items():
        wire = {g.name: g for g in n.groups}
        assert n.step == 0 and [g.sharded for g in n.groups] == [True] * 4
        for name in ("host", "a", "b"):
            assert rel_err(wire[name].sq, outs[rank]["ref"][name]) <= 1e-5
        # On the wire a group's params are the elements this rank counts: half of tp's.
        assert (
            rel_err(wire["tp"].sq, outs[rank]["tp"]["local_ref"]) <= 1e-5 and wire["tp"].params == 9
        )
    fingerprints = [{g.name: g.fingerprint for g in norms[rank].groups} for rank in (0, 1)]
    for name in ("host", "a", "b"):  # the same parameters on both ranks: replicas
        assert fingerprints[0][name] == fingerprints[1][name] is not None
    assert fingerprints[0]["tp"] != fingerprints[1]["tp"]  # different shards: parts
    declared = {
        e.rank: {d.name: d.fingerprint for d in e.groups} for e in events if isinstance(e, Hello)
    }
    assert declared == {0: fingerprints[0], 1: fingerprints[1]}
    assert sorted(e.rank for e in events if isinstance(e, Goodbye)) == [0, 1]


_BUCKET_VIEW_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    import esper_telemetry as et
    from collector_support import ref_sq

    rank, port, endpoint = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Module()
    # Weights of 33,667, 34,453 and 33,401 entries: read in rows of 512 with a tail each.
    model.host = nn.Sequential(nn.Linear(257, 131), nn.Tanh(), nn.Linear(131, 263))
    model.seed = nn.Linear(263, 127)
    model.forward = lambda x: model.seed(model.host(x)).square().mean()
    ddp = DDP(model, gradient_as_bucket_view=True, bucket_cap_mb=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tel = et.attach(model=model, host="host", seeds={"s": "seed"}, endpoint=endpoint,
                    run="bucket-views")
    out = []
    for step in range(3):
        x = torch.randn(9, 257, generator=torch.Generator().manual_seed(10 * step + rank))
        ddp(x).backward()
        views = sum(p.grad.storage_offset() > 0 for p in model.parameters())
        tel.capture(step=step)
        assert tel.flush(10.0)
        got = tel.latest().groups
        out.append({
            "views": int(views),
            "sq": {n: got[n].sq for n in ("host", "s")},
            "ref": {"host": ref_sq(model.host.parameters()), "s": ref_sq(model.seed.parameters())},
        })
        opt.step()
        opt.zero_grad()
    print(json.dumps({"steps": out, "errors": tel.stats()["errors"]}), flush=True)
    tel.close()
    dist.destroy_process_group()
""")


def test_ddp_gradients_as_bucket_views_are_read_where_they_lie(tmp_path, pull):
    # DDP's gradient_as_bucket_view: every gradient is a view at an offset into a bucket;
    # large ones are read in rows and a tail, which must start at the view's own offset.
    outs = _two_ranks(tmp_path, _BUCKET_VIEW_SCRIPT, pull.endpoint, timeout_s=90)
    for r in outs:
        assert r["errors"] == 0
        for step in r["steps"]:
            assert step["views"] >= 3  # gradients at offsets into their buckets
            for name in ("host", "s"):
                assert rel_err(step["sq"][name], step["ref"][name]) <= 1e-5, (name, step)
