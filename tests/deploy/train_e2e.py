"""A real training loop with the collector attached, for the end-to-end deploy test.

Groups: ``host`` (trained), ``seed`` (a seed on detached host features, trained) and
``frozen`` (declared isolated: it must receive no gradient). After ``--steps`` clean steps
it writes the float64 reference norms of its last step to ``--out`` and prints ``READY
clean``, then waits for a line on stdin: ``leak`` runs ``--leak-steps`` more steps in which
the frozen group's output enters the loss (so it receives gradient: an isolation
violation), ``exit`` (or end of input, or --wait-s without a line) closes the collector.

    python tests/deploy/train_e2e.py --run RUN --endpoint tcp://127.0.0.1:PORT --out ref.json
"""

from __future__ import annotations

import argparse
import json
import math
import select
import sys

import torch
from torch import nn

import esper_telemetry as et


def norm64(module: nn.Module) -> float | None:
    """The float64 L2 norm of a module's gradient; None when no parameter has one."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))


def command(wait_s: float) -> str:
    ready, _, _ = select.select([sys.stdin], [], [], wait_s)
    if not ready:
        return "timeout"
    line = sys.stdin.readline()
    return line.strip() or "exit"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--leak-steps", type=int, default=3)
    ap.add_argument("--wait-s", type=float, default=90.0)
    args = ap.parse_args()

    torch.manual_seed(1234)
    host = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    seed = nn.Linear(32, 8)
    frozen = nn.Linear(8, 8)
    opt = torch.optim.SGD(list(host.parameters()) + list(seed.parameters()), lr=0.05)
    x = torch.randn(64, 16)
    y = torch.randn(64, 8)

    tel = et.attach(
        model=None,
        host=host,
        seeds={"seed": seed},
        groups={"frozen": frozen},
        run=args.run,
        endpoint=args.endpoint,
        isolated=("frozen",),
        heartbeat_s=1.0,
    )
    reference: dict[str, object] = {
        "run": args.run,
        "params": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("host", host), ("seed", seed), ("frozen", frozen))
        },
    }

    def step(i: int, leak: bool) -> None:
        for m in (host, seed, frozen):
            m.zero_grad(set_to_none=True)
        features = host[1](host[0](x))
        # The seed trains on detached host features: nothing flows back into the host.
        out = host[2](features) + 0.1 * seed(features.detach())
        loss = nn.functional.mse_loss(out, y)
        if leak:
            # The bug under test: the frozen probe's output joins the loss undetached.
            loss = loss + frozen(out).pow(2).mean()
        else:
            with torch.no_grad():
                frozen(out)
        loss.backward()
        tel.capture(step=i)
        reference.update(
            step=i, norms={"host": norm64(host), "seed": norm64(seed), "frozen": norm64(frozen)}
        )
        opt.step()

    def publish(phase: str) -> None:
        reference["flushed"] = tel.flush(timeout_s=5)
        reference["phase"] = phase
        with open(args.out, "w") as f:
            json.dump(reference, f)
        print(f"READY {phase}", flush=True)

    try:
        for i in range(args.steps):
            step(i, leak=False)
        publish("clean")
        cmd = command(args.wait_s)
        if cmd == "leak":
            for i in range(args.steps, args.steps + args.leak_steps):
                step(i, leak=True)
            publish("leak")
            command(args.wait_s)
    finally:
        tel.close()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
