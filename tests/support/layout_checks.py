"""Checks of a layout run's outcome, shared by the gloo layout tests: the daemon's exposition
once the runs ended, each rank's report, and the daemon's figures against the references."""

from __future__ import annotations

from collector_support import rel_err
from daemon_support import get
from layout_support import STEPS
from live_daemon import LiveDaemon, Samples

# float32 gradients, squares accumulated as the README's accuracy says (1e-5 on a norm).
RTOL_SQ = 2e-5


def ended(daemon: LiveDaemon, runs: list[str]) -> Samples:
    """The exposition once every rank of ``runs`` said goodbye (their final values kept)."""
    return daemon.scrape_until(
        lambda s: all(get(s, "esper_run_ended", run=r) == 1 for r in runs),
        f"runs {runs} ended",
        timeout_s=20.0,
    )


def reports(outs: list[dict], layout: str) -> list[dict]:
    return [o["report"][layout] for o in outs]


def check_daemon_exact(samples: Samples, run: str, rep: dict) -> None:
    """Every group with a reference: its norm is the full gradient's, its parameter count
    the whole group's, the step the last, and nothing flagged."""
    for group, ref in rep["ref"].items():
        norm = get(samples, "esper_grad_norm", run=run, group=group)
        assert norm is not None, (run, group)
        assert rel_err(norm * norm, ref) <= RTOL_SQ, (run, group, norm * norm, ref)
        assert (
            get(samples, "esper_group_parameters", run=run, group=group) == rep["ref_params"][group]
        )
        assert get(samples, "esper_group_inconsistent", run=run, group=group) == 0
        assert get(samples, "esper_group_last_step", run=run, group=group) == STEPS - 1
