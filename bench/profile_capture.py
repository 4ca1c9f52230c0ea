"""Where the host time of ``capture()`` goes: cProfile over captures of N gradient tensors.

    python bench/profile_capture.py [--tensors 155] [--calls 300] [--realloc] [--helpers N]

Captures are paced (each waits for the previous one to complete, outside the timed call)
so the numbers are the training thread's own cost, not contention with a backlog.
``--realloc`` gives every capture new gradient tensors (as ``zero_grad(set_to_none=True)``
and ``backward()`` do), rotating through more sets than a plan remembers addresses of;
``--helpers`` sets how many helper threads share a CPU pass (default: one fewer than the cores).
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
    ap.add_argument(
        "--realloc", action="store_true", help="new gradient tensors before every capture"
    )
    ap.add_argument(
        "--helpers", type=int, default=None, help="CPU helper threads (default: cores - 1)"
    )
    args = ap.parse_args()
    if args.helpers is not None:
        from esper_telemetry.collector import cpu_threads

        cpu_threads.usable_cores = lambda: args.helpers + 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Module()
    model.host = torch.nn.ParameterList(
        [
            torch.nn.Parameter(torch.zeros(args.numel, device=device))
            for _ in range(args.tensors - 4)
        ]
    )
    model.seed = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(args.numel, device=device)) for _ in range(4)]
    )
    params = list(model.parameters())
    sets = [[torch.randn_like(p) for p in params] for _ in range(6 if args.realloc else 1)]
    turn = [0]

    def install() -> None:
        turn[0] += 1
        for p, g in zip(params, sets[turn[0] % len(sets)]):
            p.grad = g

    install()
    tel = et.attach(
        model=model,
        host="host",
        seeds={"seed": "seed"},
        run="profile",
        endpoint="tcp://127.0.0.1:9",
    )
    for _ in range(10):
        tel.capture()
    tel.flush(10)

    def paced(n: int) -> list:
        samples = []
        for _ in range(n):
            if args.realloc:
                install()
            t0 = time.perf_counter()
            tel.capture()
            samples.append(time.perf_counter() - t0)
            tel._completion.wait_idle(5.0)
        return samples

    samples = paced(args.calls)
    print(
        f"{device}: capture() of {args.tensors} tensors, paced: median "
        f"{statistics.median(samples) * 1e6:.0f} us, "
        f"p90 {sorted(samples)[int(len(samples) * 0.9)] * 1e6:.0f} us"
    )
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
