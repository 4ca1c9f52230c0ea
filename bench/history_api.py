"""What the history API costs at the caps: 128 groups of a run, every step kept.

Builds ``RunHistory`` records from real ``StepRecord``s (a host and 127 seeds, log-normal
norms) and times, per document, what the daemon's worker thread does for
``GET /api/v1/runs/<run>/history``: ``api.history_document`` (points cleaned, seeds' ratios
by ``seed_ratios``), ``api.encode`` (JSON, group by group), and gzip at level 1, which the
daemon applies when the client accepts it. Three shapes:

- ``1,024 steps``: the issue's figure, 1,024 steps per group, nothing folded yet;
- ``full``: the rings at their fullest (1,039 steps shown in full, 128 folded buckets);
- ``poll``: what a page that already holds everything asks each second
  (``?since=<last - 1>&folded_since=...``: one new step per group).

Wall and thread CPU time, median of ``--trials``; the box may be shared, so CPU time is the
steadier figure. Writes its section of bench/RESULTS.md.

    python bench/history_api.py [--groups 128] [--trials 5]
"""

from __future__ import annotations

import argparse
import gzip
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from esper_telemetry.daemon import api  # noqa: E402
from esper_telemetry.daemon.steps import (  # noqa: E402
    GroupHistory,
    RunHistory,
    StepRecord,
    StepRules,
)


def run_history(groups: int, steps: int, rules: StepRules) -> RunHistory:
    rng = random.Random(0)
    out = []
    for g in range(groups):
        rec = StepRecord(rules)
        scale = 10.0 ** -(g % 6)
        for s in range(steps):
            v = scale * rng.lognormvariate(0, 0.3)
            rec.push(s, v * v)
        rec.settle(0)
        out.append(
            GroupHistory(
                "host" if g == 0 else f"seed_{g:03d}",
                "host" if g == 0 else "seed",
                1_000_000 if g == 0 else 4096 + g,
                rec.points(),
                rec.folded(),
                list(rec.nonfinite_steps),
                list(rec.violation_steps),
                rec.spikes,
                rec.extremes(0),
                False,
                None,
            )
        )
    return RunHistory("bench", False, steps - 1, tuple(out))


def measure(history: RunHistory, trials: int, **query: int) -> dict[str, float]:
    rows: dict[str, list[float]] = {}
    for _ in range(trials):
        w0, c0 = time.perf_counter(), time.thread_time()
        doc = api.history_document(history, **query)
        w1, c1 = time.perf_counter(), time.thread_time()
        body = api.encode(doc)
        w2, c2 = time.perf_counter(), time.thread_time()
        packed = gzip.compress(body, compresslevel=1)
        w3 = time.perf_counter()
        for key, value in (
            ("build_ms", 1e3 * (w1 - w0)),
            ("build_cpu_ms", 1e3 * (c1 - c0)),
            ("encode_ms", 1e3 * (w2 - w1)),
            ("encode_cpu_ms", 1e3 * (c2 - c1)),
            ("gzip_ms", 1e3 * (w3 - w2)),
            ("bytes", len(body)),
            ("gzip_bytes", len(packed)),
            ("points", sum(len(g["points"]) for g in doc["groups"])),
        ):
            rows.setdefault(key, []).append(value)
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    rules = StepRules()
    full_steps = rules.ring_steps - 1 + rules.fold_steps * rules.fold_buckets
    shapes = []
    h = run_history(args.groups, rules.history_steps, rules)
    shapes.append(("1,024 steps", measure(h, args.trials)))
    h = run_history(args.groups, full_steps, rules)
    shapes.append(("full", measure(h, args.trials)))
    fill = min(g.folded[-1][0] for g in h.groups) - 1
    shapes.append(("poll", measure(h, args.trials, since=h.last_step - 1, folded_since=fill)))
    lines = [
        "## History API",
        "",
        f"`python bench/history_api.py --groups {args.groups} --trials {args.trials}` on "
        f"{machine()}; medians. One document for a run of {args.groups} groups (a host and "
        "seeds, so every seed carries its ratio); times are the daemon's worker thread's "
        "(the provider's copies are taken on the loop before it).",
        "",
        "| shape | points | build ms (CPU) | encode ms (CPU) | gzip ms | bytes | gzipped |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in shapes:
        lines.append(
            f"| {name} | {m['points']:,.0f} | {m['build_ms']:.1f} ({m['build_cpu_ms']:.1f}) | "
            f"{m['encode_ms']:.1f} ({m['encode_cpu_ms']:.1f}) | {m['gzip_ms']:.1f} | "
            f"{m['bytes']:,.0f} | {m['gzip_bytes']:,.0f} |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    write_section("## History API", section)


if __name__ == "__main__":
    main()
