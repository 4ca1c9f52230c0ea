"""What the first ``attach`` imports: DTensor support only for a model that has DTensors.

Importing ``torch.distributed.tensor`` costs about half a second (it once made the first
attach take 560 ms), so nothing in the collector may import it; a DTensor cannot exist
before something else did. Checked in a fresh interpreter, where ``sys.modules`` shows what
the collector itself pulled in.
"""

from __future__ import annotations

import json
import textwrap

from collector_support import free_port, run_script

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from torch import nn
    import esper_telemetry as et
    before = "torch.distributed.tensor" in sys.modules
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    t0 = time.perf_counter()
    tel = et.attach(model=model, host="0", seeds={"s": "1"}, run="imports", endpoint=sys.argv[1])
    first = time.perf_counter() - t0
    model(torch.randn(2, 8)).sum().backward()
    tel.capture()
    ok = tel.flush(5.0)
    sq = tel.latest().groups["s"].sq
    tel.close(0.5)
    print(json.dumps({"before": before, "after": "torch.distributed.tensor" in sys.modules,
                      "dynamo": "torch._dynamo" in sys.modules,
                      "first_s": first, "ok": ok, "sq": sq}))
""")


def test_attach_and_capture_import_no_dtensor_support(tmp_path):
    script = tmp_path / "attach_imports.py"
    script.write_text(SCRIPT)
    done = run_script(script, [f"tcp://127.0.0.1:{free_port()}"], timeout_s=60.0)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ok"] and got["sq"] > 0  # the capture really ran
    assert got["before"] is False  # torch alone does not import it ...
    assert got["after"] is False, "attach or capture imported torch.distributed.tensor"
    assert got["dynamo"] is False, "attach or capture imported torch._dynamo"
