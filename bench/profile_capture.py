"""Where the host time of ``capture()`` goes: cProfile over captures of N gradient tensors.

    python bench/profile_capture.py [--tensors 155] [--calls 300]

Captures are paced (each waits for the previous one to complete, outside the timed call)
so the numbers are the training thread's own cost, not contention with a backlog.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch

import esper_telemetry as et


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=155)
    ap.add_argument("--numel", type=int, default=1 << 16)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Module()
    model.host = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(args.numel, device=device)) for _ in range(args.tensors - 4)])
    model.seed = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(args.numel, device=device)) for _ in range(4)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    tel = et.attach(model=model, host="host", seeds={"seed": "seed"}, run="profile",
                    endpoint="tcp://127.0.0.1:9")
    for _ in range(10):
        tel.capture()
    tel.flush(10)

    def paced(n: int) -> list:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            tel.capture()
            samples.append(time.perf_counter() - t0)
            tel._completion.wait_idle(5.0)
        return samples

    samples = paced(args.calls)
    print(f"{device}: capture() of {args.tensors} tensors, paced: median "
          f"{statistics.median(samples) * 1e6:.0f} us, p90 {sorted(samples)[int(len(samples) * .9)] * 1e6:.0f} us")
    prof = cProfile.Profile()
    prof.enable()
    paced(args.calls)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    print(tel.stats())
    tel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
