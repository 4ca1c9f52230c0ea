"""The deployed alert rules, evaluated by promtool on the daemon's own exposition.

The rule unit tests in deploy/prometheus/tests write their input series by hand. Here the
series are what the daemon renders: an aggregator fed the events of a run, minute by
minute on a fake clock, scraped with the daemon's text encoder each minute; every sample
becomes a promtool input series, values written as the exposition wrote them (+Inf, NaN).
So a change to what the daemon exports for an exploding gradient that the rules do not
follow fails here.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from daemon_support import FakeClock, exposition, gn, heartbeat, hello, make_limits, norms, parse
from deploy_support import RULES, tool

from esper_telemetry.daemon.aggregator import Aggregator
from esper_telemetry.daemon.stats import DaemonStats

MINUTES = 20
CAPTURES_PER_MINUTE = 10
DECLS = (("host", "host", 400, False), ("seed", "seed", 100, False))
Series = dict[tuple[str, tuple[tuple[str, str], ...]], list[float | None]]


def scrape_each_minute(seed_sq_at: Callable[[int], float]) -> Series:
    """Every sample of the daemon's exposition at each minute of a run whose seed's sum of
    squares at minute m is ``seed_sq_at(m)`` (non-finite sums come with a non-finite count,
    as the collector sends them)."""
    clock = FakeClock()
    agg = Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.alerts"))
    agg.apply_batch([hello(run="boom", decls=DECLS)], clock())
    series: Series = {}
    step = 0
    for minute in range(MINUTES + 1):
        for _ in range(CAPTURES_PER_MINUTE):
            step += 1
            sq = seed_sq_at(minute)
            agg.apply_batch(
                [
                    norms(
                        "boom",
                        0,
                        step,
                        (
                            gn("host", 16.0, "host", 400),
                            gn("seed", sq, "seed", 100, nonfinite=0 if math.isfinite(sq) else 1),
                        ),
                        time_=1_700_000_000.0 + minute * 60,
                    )
                ],
                clock(),
            )
            clock.advance(60 / CAPTURES_PER_MINUTE)
        for key, value in parse(exposition(agg)).items():
            if key[0].startswith("esper_"):
                series.setdefault(key, [None] * (MINUTES + 1))[minute] = value
    return series


def promtool_values(values: Sequence[float | None]) -> str:
    """promtool's expanding notation, one value per minute: '_' where the series is absent."""

    def one(v: float | None) -> str:
        if v is None:
            return "_"
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)

    return " ".join(one(v) for v in values)


def alerts_firing(
    series: Series, alertname: str, at_minute: int, tmp: Path
) -> list[dict[str, str]]:
    """The alerts named ``alertname`` that promtool evaluates as firing at ``at_minute``,
    from the deployed rules over ``series`` (labels, and the summary as ``summary``):
    learned by asserting none and reading the failure, which lists what fired."""
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}",
                        "values": promtool_values(values),
                    }
                    for (name, labels), values in sorted(series.items())
                ],
                "alert_rule_test": [
                    {"eval_time": f"{at_minute}m", "alertname": alertname, "exp_alerts": []}
                ],
            }
        ],
    }
    path = tmp / "exposition.test.yml"
    path.write_text(json.dumps(tests))  # JSON is YAML
    result = subprocess.run(
        [tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    out = result.stdout + result.stderr
    if result.returncode == 0:
        return []
    assert "got:[" in out, f"promtool failed for another reason:\n{out}"
    got = out.split("got:[", 1)[1]
    fired = []
    for chunk in got.split("Labels:")[1:]:
        labels = chunk.split("{", 1)[1].split("}", 1)[0]
        alert = dict(
            (k.strip(), v.strip().strip('"'))
            for k, v in (pair.split("=", 1) for pair in labels.split(", "))
        )
        alert["summary"] = chunk.split('summary="', 1)[1].split('"', 1)[0]
        fired.append(alert)
    assert fired, f"could not read the alerts promtool reported:\n{out}"
    return fired


def test_an_exploding_seed_as_the_daemon_exports_it_fires_the_non_finite_alert(tmp_path) -> None:
    # Healthy for 5 minutes, then the seed's gradient holds an Inf at every capture.
    series = scrape_each_minute(lambda m: 4.0 if m < 5 else math.inf)
    norm = series[("esper_grad_norm", (("group", "seed"), ("run", "boom")))]
    assert norm[4] == 2.0 and norm[MINUTES] == math.inf  # what the daemon exported
    fired = alerts_firing(series, "EsperNonFiniteGradients", 17, tmp_path)
    assert [(a["run"], a["group"], a["severity"]) for a in fired] == [("boom", "seed", "warning")]
    # Never read as a starved seed: the ratio band's alert fires on the high side, at +Inf.
    assert (
        series[("esper_seed_grad_ratio", (("run", "boom"), ("seed", "seed")))][MINUTES] == math.inf
    )
    (band,) = alerts_firing(series, "EsperSeedGradRatioOutOfBand", 17, tmp_path)
    assert "gradient ratio +Inf out of band" in band["summary"], band
    assert alerts_firing(series, "EsperNonFiniteGradients", 3, tmp_path) == []


def test_a_healthy_run_as_the_daemon_exports_it_fires_nothing_about_gradients(tmp_path) -> None:
    series = scrape_each_minute(lambda m: 4.0)
    for alert in (
        "EsperNonFiniteGradients",
        "EsperSeedGradRatioOutOfBand",
        "EsperIsolationViolation",
    ):
        assert alerts_firing(series, alert, 17, tmp_path) == [], alert


def test_a_collector_clock_two_hours_off_neither_hides_a_hang_nor_fires_on_a_healthy_run(
    tmp_path,
) -> None:
    # Two ranks per run, rank 1's clock 2 h behind (or ahead, or absurd), both capturing each
    # minute; "hung" stops capturing at minute 60 while its ranks still heartbeat. Before,
    # esper_last_capture_timestamp_seconds took the capturing rank's clock: it jumped by
    # 2 h from step to step, the hang went unalerted at 75 and 150 min and a healthy run
    # fired "no captures for 2h". Now it is when the daemon received the capture.
    minutes = 160
    skews = {"behind": -7200.0, "ahead": 7200.0, "hung": -7200.0, "absurd": None}
    clock = FakeClock()
    agg = Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.skew"))
    unix = lambda: clock() - 1000.0  # noqa: E731  promtool's time() is 0 at minute 0
    for run in skews:
        agg.apply_batch([hello(run, rank, world_size=2, decls=DECLS) for rank in (0, 1)], clock())
    keep = (
        "esper_last_capture_timestamp_seconds",
        "esper_collectors",
        "esper_run_ended",
        "esper_last_step",
    )
    series: Series = {}
    for minute in range(minutes + 1):
        for run, skew in skews.items():
            if run == "hung" and minute > 60:
                agg.apply_batch([heartbeat(run, rank) for rank in (0, 1)], clock())
                continue
            for rank in (1, 0) if minute % 2 else (0, 1):
                t = unix() if rank == 0 else (1e300 if skew is None else unix() + skew)
                groups = (gn("host", 16.0, "host", 400), gn("seed", 4.0, "seed", 100))
                agg.apply_batch([norms(run, rank, minute, groups, time_=t)], clock())
        agg.tick(clock(), unix())
        for key, value in parse(exposition(agg)).items():
            if key[0] in keep:
                series.setdefault(key, [None] * (minutes + 1))[minute] = value
        clock.advance(60.0)
    stamps = series[("esper_last_capture_timestamp_seconds", (("run", "behind"),))]
    assert stamps[100] == 100 * 60.0  # the daemon's clock, not either rank's
    assert series[("esper_last_capture_timestamp_seconds", (("run", "hung"),))][150] == 60 * 60.0
    for at in (50, 75, 150):
        fired = alerts_firing(series, "EsperCapturesStalled", at, tmp_path)
        assert sorted(a["run"] for a in fired) == ([] if at == 50 else ["hung"]), (at, fired)
