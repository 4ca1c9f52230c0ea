"""Host time of the plan cache's fast path per capture: reading the gradients' addresses, and
checking that a plan bound to them still fits (element counts and dtypes, ``still_fits``).

On CUDA the plans are real (CUDA slices); without CUDA, CPU tensors stand in and the plans
are marked as bound to addresses, which is all the fast path looks at. Prints one line per
tensor count: the old address loop, the address pass now, ``still_fits``, and the whole
fast path of ``PlanCache.plan_for`` (medians of repeats of the thread's CPU time,
microseconds per call).

    python bench/plan_fast_path.py [--counts 155,2000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esper_telemetry.collector import plancache


def _old_key(grads):
    return tuple([0 if g is None else g.data_ptr() for g in grads])


def _median_us(fn, number: int, repeats: int) -> float:
    """Median over repeats of the calling thread's CPU time per call (a shared machine's
    preemptions left out)."""
    runs = []
    for _ in range(repeats):
        t0 = time.thread_time_ns()
        for _ in range(number):
            fn()
        runs.append((time.thread_time_ns() - t0) / number / 1e3)
    return statistics.median(runs)


def measure(n: int, device: str, repeats: int) -> dict[str, float]:
    params = [torch.nn.Parameter(torch.zeros(1024, device=device)) for _ in range(n)]
    grads = [torch.randn(1024, device=device) for _ in params]
    groups = [tuple(params)]
    cache = plancache.PlanCache(lambda old, new: None, pointer_tables=False)
    plan = cache.plan_for(grads, False, groups, [False], [1024 * n])
    rows = {
        "old address loop": lambda: _old_key(grads) == plan.key,
        "grad_key": lambda: plancache.grad_key(grads) == plan.key,
        "still_fits": lambda: plancache.still_fits(plan, grads),
        "plan_for fast path": lambda: cache.plan_for(grads, False, groups, [False], [1024 * n]),
    }
    number = max(10, 20000 // n)
    got = {name: _median_us(fn, number, repeats) for name, fn in rows.items()}
    assert cache.built == 1, "the fast path rebuilt the plan"
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="155,2000")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        real = plancache.build_plan

        def bound(*a, **k):
            plan = real(*a, **k)
            plan.cuda = [plan.cpu]
            return plan

        plancache.build_plan = bound
    print(f"device {torch.cuda.get_device_name(0) if cuda else 'cpu (stand-in plans)'}")
    for n in (int(c) for c in args.counts.split(",")):
        got = measure(n, "cuda" if cuda else "cpu", args.repeats)
        print(f"{n:5d} tensors: " + ", ".join(f"{k} {v:.1f} us" for k, v in got.items()))


if __name__ == "__main__":
    main()
