"""Calibrate the daemon's spike rule on healthy training: how far above its recent median a
group's gradient norm goes when nothing is wrong.

Two healthy runs of 2,000 steps on the CPU, each group's norm computed in float64 from its
gradients at every step (no collector, no daemon: the rule is judged on the values alone):

- the demo's host with two seeds (``esper-telemetry demo``'s model and loop);
- a GPT-2 built from a small config (random weights, no download) trained on a fixed
  bigram language, AdamW with warm-up and clipping, the model as the host and a low-rank
  adapter per block as seeds.

For each group it reports the largest ratio of a norm to the median of the group's previous
``--history`` norms (after ``--min-history``), and how many steps the rule in
``esper_telemetry.daemon.steps`` counts as spikes at each candidate factor; then it plants a
20x step in one seed and checks it is counted once, for that group only. Writes its section
of bench/RESULTS.md.

    python bench/spike_rule.py [--steps 2000] [--history 32] [--min-history 8]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from esper_telemetry.commands.demo import DemoNet, make_data  # noqa: E402
from esper_telemetry.daemon.steps import StepRecord, StepRules  # noqa: E402

FACTORS = (3.0, 4.0, 5.0, 7.0, 10.0)


def group_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """Each group's gradient norm in float64 (0 without gradient)."""
    out = {}
    for name, params in groups.items():
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        out[name] = math.sqrt(sq)
    return out


def demo_run(steps: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    net = DemoNet()
    groups = {"host": list(net.host.parameters())}
    groups.update({f"seed:{n}": list(m.parameters()) for n, m in net.seeds.items()})
    gen = torch.Generator().manual_seed(0)
    x, y = make_data(512, net.d_in, net.n_classes, torch.device("cpu"), gen)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    series: dict[str, list[float]] = {g: [] for g in groups}
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        logits, seed_logits = net(x[idx])
        loss = loss_fn(logits, y[idx]) + sum(loss_fn(o, y[idx]) for o in seed_logits.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g, n in group_norms(groups).items():
            series[g].append(n)
        opt.step()
    return series


class Adapter(nn.Module):
    """A low-rank residual on a block's output (a seed)."""

    def __init__(self, width: int, rank: int = 4) -> None:
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.down(h))


def gpt2_run(steps: int) -> dict[str, list[float]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=256)
    model = GPT2LMHeadModel(cfg)
    adapters = nn.ModuleList(Adapter(cfg.n_embd) for _ in range(cfg.n_layer))
    for block, adapter in zip(model.transformer.h, adapters):
        block.register_forward_hook(
            lambda _m, _i, out, a=adapter: (
                (a(out[0]), *out[1:]) if isinstance(out, tuple) else a(out)
            )
        )
    groups = {"host": [p for p in model.parameters()]}
    groups.update({f"seed:adapter{i}": list(a.parameters()) for i, a in enumerate(adapters)})
    params = [*model.parameters(), *adapters.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(0)
    # The corpus: a fixed bigram language (each token has a few likely successors), so the
    # loss settles at the language's entropy, as a fine-tune's does on real text, instead
    # of falling to zero.
    logits = torch.randn(cfg.vocab_size, cfg.vocab_size, generator=gen) * 3.0
    transition = torch.softmax(logits, dim=1)
    series: dict[str, list[float]] = {g: [] for g in groups}
    for _ in range(steps):
        ids = torch.empty(8, 32, dtype=torch.long)
        ids[:, 0] = torch.randint(0, cfg.vocab_size, (8,), generator=gen)
        for t in range(1, 32):
            ids[:, t] = torch.multinomial(transition[ids[:, t - 1]], 1, generator=gen)[:, 0]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g, n in group_norms(groups).items():
            series[g].append(n)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return series


def worst_ratio(norms: list[float], history: int, least: int) -> float:
    worst = 0.0
    for i in range(least, len(norms)):
        base = statistics.median(norms[max(0, i - history) : i])
        if base > 0:
            worst = max(worst, norms[i] / base)
    return worst


def spikes(norms: list[float], rules: StepRules) -> int:
    rec = StepRecord(rules)
    for step, n in enumerate(norms):
        rec.push(step, n * n)
    rec.settle(0)
    return rec.spikes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--history", type=int, default=32)
    ap.add_argument("--min-history", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = {"demo": demo_run(args.steps), "gpt2": gpt2_run(args.steps)}
    default = StepRules().spike_factor
    lines = [
        "## Spike rule",
        "",
        f"`python bench/spike_rule.py` ({machine(f'torch {torch.__version__}')}).",
        f"Two healthy runs of {args.steps} steps each, every group's norm in float64 at every "
        "step: the demo's host and two seeds (Adam 3e-3), and a 2-layer GPT-2 from a config "
        "(AdamW 1e-3 with 100 warm-up steps, clipping at 1.0) with a low-rank adapter per "
        "block as seeds, trained on a fixed bigram language (its loss settles at the "
        "language's entropy, as a fine-tune's does on text). Baseline: the median of the "
        f"previous {args.history} norms, "
        f"judged after {args.min_history}.",
        "",
        "| run | group | largest norm / baseline | "
        + " | ".join(f"spikes at {f:g}x" for f in FACTORS)
        + " |",
        "|---|---|---:|" + "---:|" * len(FACTORS),
    ]
    worst_all = 0.0
    for run, series in runs.items():
        for group, norms in series.items():
            worst = worst_ratio(norms, args.history, args.min_history)
            worst_all = max(worst_all, worst)
            counts = [
                spikes(
                    norms,
                    StepRules(
                        spike_factor=f,
                        spike_history=args.history,
                        spike_min_history=args.min_history,
                    ),
                )
                for f in FACTORS
            ]
            lines.append(
                f"| {run} | {group} | {worst:.2f} | " + " | ".join(map(str, counts)) + " |"
            )
    # One planted 20x step in one seed of each run: counted once, for that group only.
    planted = []
    for run, series in runs.items():
        seed = next(g for g in series if g.startswith("seed:"))
        at = len(series[seed]) // 2
        got = {}
        for group, norms in series.items():
            norms = list(norms)
            if group == seed:
                norms[at] *= 20.0
            got[group] = spikes(norms, StepRules())
        planted.append(f"{run}: 20x at step {at} of {seed} -> {got}")
    lines += [
        "",
        f"Largest healthy ratio over all groups: {worst_all:.2f}; the default factor is "
        f"{default:g}x, so a healthy step would need to jump {default / worst_all:.1f} times "
        "further than the worst seen here to count.",
        "",
        "Planted spike (default rule): " + "; ".join(planted) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("## Spike rule", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
