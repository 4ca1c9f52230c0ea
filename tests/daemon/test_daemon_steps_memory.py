"""What every step costs in memory, read from /proc of a real ``esper-telemetryd`` process.

Each group keeps a fixed amount of every-step state (daemon/steps.py): rings, growing by
doubling to their full size, of the last 1,040 steps and 195 folded buckets of 16 steps, the spike
baseline, the window's buckets. ``StepRules().bytes_per_group()`` is the bound
docs/daemon.md multiplies out. Here ``RUNS`` runs of 128 groups (the per-run cap) are each
sent enough steps to fill the history and every folded bucket, and the RSS they added from
the idle daemon, per group (all its state: the rings, its record in the aggregator, its
series), must stay within that bound plus an allowance for the group's other state and the
interpreter's allocator (arenas it keeps, list over-allocation).

The sender waits for every ``PACE`` rounds to be applied: sent as fast as it can encode, the
queue held tens of MB of decoded messages at once, and the allocator kept them (103 KB per
group then, against 54.5 KB paced: a queue's high-water mark, not the steps' state).
Measured (2-core AMD EPYC): 20 x 128 groups, 4,224 steps each, 45,960 B per group of all
state against the bound's 29,696 and the allowance's 24,576 (before the rings: 56,064
B of all state, 54,544 of it added after the first step).
"""

from __future__ import annotations

import json
import time

import pytest
import zmq
from daemon_support import get, http_get
from live_daemon import LiveDaemon

from esper_telemetry import GroupDecl, GroupNorm, Hello, Norms, encode
from esper_telemetry.daemon.config import Config
from esper_telemetry.daemon.steps import StepRules

pytestmark = pytest.mark.slow

RUNS = 20  # of the cap's 100: a message of 128 groups costs ~85 us to encode here
GROUPS = 128  # the cap per run (--limits.max-groups-per-run)
RULES = StepRules()
# Enough steps to fill the history ring and every folded bucket.
STEPS = RULES.ring_steps + RULES.ring_buckets * RULES.fold_steps + 64
PER_MESSAGE = 16
PACE = 4  # rounds (of PER_MESSAGE steps of every run) sent before waiting for them
# Bytes per group beyond the steps' bound: everything else a group of a full run holds (the
# aggregator's record of it, its labels in the exposition's caches, the layout's entry) and
# the allocator's slack. Measured with the rings (29.7 KB a group): all state 46.0 KB a
# group (before them: 54.5 to 59.7 KB a group over four runs, the steps' state alone).
ALLOWANCE = 24 << 10


def _wait(d: LiveDaemon, events: int, timeout_s: float) -> dict:
    return d.scrape_until(
        lambda s: get(s, "esper_daemon_events_total") == events,
        f"{events} events applied",
        timeout_s=timeout_s,
    )


def _applied(d: LiveDaemon, run: str, step: int, timeout_s: float = 30.0) -> None:
    """Wait until ``run``'s ``step`` is applied (the API's runs list: cheaper than a scrape),
    so the queue never holds more than ``PACE`` rounds of decoded messages."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body, _ = http_get(f"{d.web}/api/v1/runs")
        if status == 200 and any(
            r["run"] == run and r["last_step"] == step for r in json.loads(body)["runs"]
        ):
            return
        assert time.monotonic() < deadline, f"{run} step {step} not applied in {timeout_s} s"
        time.sleep(0.02)


def test_every_step_state_per_group_stays_within_its_documented_bound(tmp_path):
    d = LiveDaemon(tmp_path / "d.log")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(d.endpoint)
    decls = tuple(GroupDecl(f"g{i:03d}", "group", 1000, False) for i in range(GROUPS))
    groups = tuple(
        GroupNorm(f"g{i:03d}", "group", 1000, 1.0 + i / 7, 0, False, False) for i in range(GROUPS)
    )
    runs = [f"mem-{r:03d}" for r in range(RUNS)]
    seq = dict.fromkeys(runs, 0)  # each run's message numbers (schema 3 carries clip)

    def send(run: str, events) -> None:
        sock.send(encode(events, seq=seq[run]))
        seq[run] += 1

    sent = 0
    try:
        base = d.rss_bytes()
        # Every group exists and has one step: what it holds besides its history.
        for run in runs:
            send(run, Hello(run, 0, 1.0, 1, "h", 1, "v", "t", decls, clip=2.0))
            send(run, Norms(run, 0, 1.0, 0, False, groups))
            sent += 2
        _wait(d, sent, 60.0)
        time.sleep(1.0)
        before = d.rss_bytes()

        message = encode([Norms(runs[0], 0, 1.0, 1, False, groups)] * PER_MESSAGE, seq=1)
        assert len(message) < Config().zmq_max_message_bytes
        start = time.monotonic()
        for step in range(1, STEPS, PER_MESSAGE):
            for run in runs:
                batch = [
                    Norms(run, 0, 1.0, s, False, groups)
                    for s in range(step, min(step + PER_MESSAGE, STEPS))
                ]
                send(run, batch)
                sent += len(batch)
            if (step // PER_MESSAGE) % PACE == PACE - 1:
                _applied(d, runs[-1], min(step + PER_MESSAGE, STEPS) - 1)
        s = _wait(d, sent, 180.0)
        took = time.monotonic() - start
        time.sleep(1.0)
        after = d.rss_bytes()
        # Every group's history is full: 128 folded buckets, the last steps in full.
        status, body, _ = http_get(f"{d.web}/api/v1/runs/{runs[-1]}/history")
        assert status == 200, body[:300]
        history = json.loads(body)
    finally:
        sock.close()
        code = d.stop()
        ctx.term()
    assert code == 0, d.log()
    assert get(s, "esper_daemon_runs") == RUNS
    for run in runs:
        assert get(s, "esper_model_steps_total", run=run) == STEPS
        # Every model norm (the sum of the groups' values) exceeded 2: all clipped.
        assert get(s, "esper_grad_clipped_total", run=run) == STEPS
        assert get(s, "esper_messages_lost_total", run=run, rank="0") in (None, 0)
    assert len(history["groups"]) == GROUPS
    for g in history["groups"]:
        # 128 full buckets, and the one filling (kept beside them: 129 can be read).
        assert len(g["folded"]) >= RULES.fold_buckets, (g["name"], len(g["folded"]))
        assert RULES.history_steps <= len(g["points"]) <= RULES.ring_steps

    n = RUNS * GROUPS
    bound = RULES.bytes_per_group()
    steps_per_group = (after - before) / n
    total_per_group = (after - base) / n
    print(
        f"\n{RUNS} runs x {GROUPS} groups, {STEPS} steps each ({sent} events in {took:.1f} s): "
        f"RSS {base / 2**20:.1f} -> {before / 2**20:.1f} (groups, one step) -> "
        f"{after / 2**20:.1f} MiB (full); steps' state {steps_per_group:.0f} B/group, "
        f"all state {total_per_group:.0f} B/group; bound {bound} B/group "
        f"(+{ALLOWANCE} allowance); at every cap full (100 x 128): "
        f"{100 * GROUPS * bound / 2**20:.0f} MiB bound"
    )
    assert total_per_group <= bound + ALLOWANCE, (total_per_group, bound)
