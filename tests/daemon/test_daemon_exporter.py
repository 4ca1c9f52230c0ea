"""The exporter: the daemon's one renderer, checked by parsing the exposition with
prometheus_client's parsers (the text one, and the strict OpenMetrics one)."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
from daemon_support import (
    exposition,
    get,
    gn,
    goodbye,
    heartbeat,
    hello,
    host_seed,
    names,
    norms,
    parse,
    render,
)
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from esper_telemetry import REASONS, DeviceMismatch, IsolationViolation
from esper_telemetry.daemon.exporter import RUN_FAMILIES, Exposition, process_registry
from esper_telemetry.daemon.stats import OVERFLOW_KINDS, REJECT_REASONS
from esper_telemetry.daemon.textformat import OPENMETRICS, TEXT


def expose(agg, process_metrics=False):
    return parse(exposition(agg, process_metrics))


def test_norm_ratio_parameters_and_gradient_flags(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch(
        [hello(decls=(("host", "host", 400, False), ("seed", "seed", 25, True)))], clock()
    )
    agg.apply_batch(
        [norms(groups=[gn("host", 16.0, "host", 400), gn("seed", 9.0, "seed", 25, isolated=True)])],
        clock(),
    )
    s = expose(agg)
    assert get(s, "esper_grad_norm", run="r", group="host") == 4.0
    assert get(s, "esper_grad_norm", run="r", group="seed") == 3.0
    # (3 / 4) * sqrt(400 / 25) = 3
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") == pytest.approx(3.0)
    assert get(s, "esper_group_parameters", run="r", group="seed") == 25
    assert get(s, "esper_group_has_gradient", run="r", group="host") == 1


@pytest.mark.parametrize("host_sq", [None, 0.0])
def test_ratio_is_zero_when_the_host_has_no_gradient_or_zero_norm(make_agg, host_sq, clock):
    agg, _ = make_agg()
    agg.apply_batch([host_seed(host_sq=host_sq, seed_sq=4.0)], clock())
    s = expose(agg)
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") == 0.0
    assert get(s, "esper_grad_norm", run="r", group="seed") == 2.0


def test_a_group_without_gradient_has_no_norm_series_and_has_gradient_zero(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([host_seed(host_sq=4.0, seed_sq=1.0)], clock())
    agg.apply_batch([host_seed(step=2, host_sq=4.0, seed_sq=None)], clock())
    s = expose(agg)
    assert get(s, "esper_grad_norm", run="r", group="seed") is None
    assert get(s, "esper_group_has_gradient", run="r", group="seed") == 0
    assert get(s, "esper_group_has_gradient", run="r", group="host") == 1
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") == 0.0


def test_isolation_ok_follows_violations_of_the_latest_captured_step(make_agg, clock):
    agg, _ = make_agg()

    def viol(step):
        return IsolationViolation("r", 0, 1.0, step, "seed", "gradient", "leak", 0.1)

    agg.apply_batch([host_seed(step=5)], clock())
    s = expose(agg)
    assert get(s, "esper_isolation_ok", run="r", group="seed") == 1
    assert get(s, "esper_isolation_ok", run="r", group="host") is None  # not isolated, not a seed
    assert get(s, "esper_isolation_violations_total", run="r", group="seed", kind="gradient") == 0
    agg.apply_batch([viol(5)], clock())
    assert get(expose(agg), "esper_isolation_ok", run="r", group="seed") == 0
    agg.apply_batch([host_seed(step=6)], clock())
    assert get(expose(agg), "esper_isolation_ok", run="r", group="seed") == 1
    agg.apply_batch(
        [viol(7), host_seed(step=7)], clock()
    )  # violation first, then the capture of its step
    s = expose(agg)
    assert get(s, "esper_isolation_ok", run="r", group="seed") == 0
    assert get(s, "esper_isolation_violations_total", run="r", group="seed", kind="gradient") == 2
    assert get(s, "esper_isolation_violations_total", run="r", group="seed", kind="structural") == 0


def test_run_level_series(make_agg, clock):
    agg, _ = make_agg(shard_window_s=1.0)
    agg.apply_batch([hello(world_size=2)], clock())
    agg.apply_batch([host_seed(rank=0, step=3, time_=1_700_000_123.5)], clock())
    agg.apply_batch([heartbeat(rank=0, dropped=4), heartbeat(rank=1, dropped=6)], clock())
    agg.apply_batch([DeviceMismatch("r", 0, 1.0, "split", "host", ("cpu", "cuda:0"))], clock())
    agg.apply_batch([norms(step=4, groups=[gn("big", 1.0, nonfinite=3, sharded=True)])], clock())
    clock.advance(2.0)
    agg.tick(clock(), 1_800_000_000.0)  # the wall clock now
    s = expose(agg)
    assert get(s, "esper_captures_total", run="r") == 2
    assert get(s, "esper_last_step", run="r") == 4
    # When the daemon received it (2 s ago), whatever the collector's clock said (1.7e9).
    assert get(s, "esper_last_capture_timestamp_seconds", run="r") == 1_799_999_998.0
    assert get(s, "esper_collectors", run="r") == 2
    assert get(s, "esper_collector_dropped_events_total", run="r") == 10
    assert get(s, "esper_device_mismatch_total", run="r", kind="split") == 1
    assert get(s, "esper_device_mismatch_total", run="r", kind="moved") == 0
    assert get(s, "esper_grad_nonfinite_total", run="r", group="big") == 1
    assert get(s, "esper_daemon_incomplete_steps_total", run="r") == 1
    assert get(s, "esper_grad_norm", run="r", group="big") is None


def test_self_metrics_are_precreated_at_zero_for_every_reason(make_agg, clock):
    agg, stats = make_agg()
    s = expose(agg)
    rejected = {dict(k)["reason"]: v for k, v in names(s, "esper_daemon_rejected_total").items()}
    assert set(REASONS) | {"queue_full"} <= set(rejected) == set(REJECT_REASONS)
    assert set(rejected.values()) == {0.0}
    overflow = {dict(k)["what"]: v for k, v in names(s, "esper_daemon_overflow_total").items()}
    assert overflow == dict.fromkeys(OVERFLOW_KINDS, 0.0)
    stats.rejected["schema"] += 3
    agg.apply_batch([host_seed(run="a"), host_seed(run="b")], clock())
    s = expose(agg)
    assert get(s, "esper_daemon_rejected_total", reason="schema") == 3
    assert get(s, "esper_daemon_events_total") == 2
    assert get(s, "esper_daemon_runs") == 2


def test_ended_and_expired_runs_vanish_from_the_exposition(make_agg, clock):
    agg, _ = make_agg(ttl_s=10.0, ended_retention_s=5.0)
    agg.apply_batch([host_seed(run="ends"), host_seed(run="expires")], clock())
    assert get(expose(agg), "esper_grad_norm", run="expires", group="host") == 4.0
    agg.apply_batch([goodbye(run="ends")], clock())
    clock.advance(11.0)
    agg.tick(clock())
    s = expose(agg)
    assert [k for k in s if ("run", "ends") in k[1] or ("run", "expires") in k[1]] == []
    assert get(s, "esper_daemon_expired_runs_total") == 1
    assert get(s, "esper_daemon_ended_runs_total") == 1
    assert get(s, "esper_daemon_runs") == 0


def test_label_values_are_escaped(make_agg, clock):
    agg, _ = make_agg()
    odd = 'run "quoted" \\ back\nslash'
    agg.apply_batch([host_seed(run=odd, host_sq=2.25)], clock())
    assert get(expose(agg), "esper_grad_norm", run=odd, group="host") == 1.5


def test_exposition_passes_promtool_check_metrics_without_warnings(make_agg, tmp_path, clock):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    agg, stats = make_agg(shard_window_s=1.0)
    agg.apply_batch([hello(world_size=2)], clock())
    agg.apply_batch(
        [
            host_seed(rank=0, step=1),
            heartbeat(rank=0, dropped=1),
            DeviceMismatch("r", 0, 1.0, "mixed", "seed", ("cpu", "cuda:0")),
            IsolationViolation("r", 0, 1.0, 1, "seed", "structural", "path", None),
            norms(step=2, groups=[gn("shard", 1.0, sharded=True, nonfinite=1)]),
        ],
        clock(),
    )
    agg.apply_batch([host_seed(run="other", host_sq=None)], clock())
    # Non-finite values (+Inf norm and ratio, NaN norm) and a stale group are in it too.
    agg.apply_batch(
        [
            norms(
                run="boom",
                groups=[
                    gn("host", 4.0, "host", 400),
                    gn("seed", math.inf, "seed", 100, nonfinite=1),
                    gn("nan", math.nan, nonfinite=1),
                ],
            ),
            DeviceMismatch("boom", 0, 1.0, "stale", "gone", ()),
        ],
        clock(),
    )
    clock.advance(2.0)
    agg.tick(clock())
    stats.rejected["malformed"] += 1
    text = exposition(agg, True).encode()  # what /metrics serves as text
    # Every kind of family is present, so the check covers them all.
    for name in (
        b"esper_grad_norm",
        b"esper_seed_grad_ratio",
        b"esper_isolation_ok",
        b"esper_daemon_incomplete_steps_total",
        b"process_cpu_seconds_total",
        b"esper_daemon_build_info",
        b"esper_group_stale",
    ):
        assert name in text
    values = {
        ln.rsplit(" ", 1)[1]
        for ln in text.decode().splitlines()
        if ln.startswith(("esper_grad_norm{", "esper_seed_grad_ratio{"))
        and 'run="boom"' in ln
        and ('"seed"' in ln or '"nan"' in ln)
    }
    assert values == {"+Inf", "NaN"}, text
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", proc.stdout + proc.stderr


def test_the_text_carries_every_runs_values_escaped_and_non_finite(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch(
        [
            host_seed(run='q"\\x\n', host_sq=2.0),
            host_seed(run="b", host_sq=None),
            IsolationViolation("b", 0, 1.0, 1, "seed", "gradient", "e", 1.0),
            norms(
                run="inf",
                groups=[
                    gn("host", 16.0, "host", 400),
                    gn("seed", math.inf, "seed", 100, nonfinite=1),
                ],
            ),
            norms(
                run="nan",
                groups=[
                    gn("host", math.nan, "host", 400, nonfinite=1),
                    gn("seed", 4.0, "seed", 100),
                ],
            ),
        ],
        clock(),
    )
    fast_s = parse(exposition(agg))
    assert len(fast_s) > 30
    assert get(fast_s, "esper_grad_norm", run='q"\\x\n', group="host") == math.sqrt(2.0)
    assert get(fast_s, "esper_group_has_gradient", run="b", group="host") == 0
    assert (
        get(fast_s, "esper_isolation_violations_total", run="b", group="seed", kind="gradient") == 1
    )
    assert get(fast_s, "esper_isolation_ok", run="b", group="seed") == 0
    assert get(fast_s, "esper_seed_grad_ratio", run="inf", seed="seed") == math.inf
    assert math.isnan(get(fast_s, "esper_seed_grad_ratio", run="nan", seed="seed"))
    assert math.isnan(get(fast_s, "esper_grad_norm", run="nan", group="host"))


def test_the_encoder_writes_what_prometheus_clients_own_writes_for_the_same_families():
    from prometheus_client import CollectorRegistry, Counter, Gauge

    extra = CollectorRegistry()  # samples the esper families never have: created, inf, nan
    Counter("t_events", "c", ["a"], registry=extra).labels("x").inc(3)
    Gauge("t_inf", "g", registry=extra).set(float("inf"))
    Gauge("t_nan", "g", registry=extra).set(float("nan"))
    fast, slow = render(extra).decode(), generate_latest(extra).decode()
    fast_s, slow_s = parse(fast), parse(slow)
    nan = [k for k, v in slow_s.items() if v != v]
    assert nan and {k: v for k, v in fast_s.items() if k not in nan} == {
        k: v for k, v in slow_s.items() if k not in nan
    }
    assert all(fast_s[k] != fast_s[k] for k in nan)
    assert _comments(fast) == _comments(slow)


def test_sqrt_of_large_sums_is_exact_enough(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([host_seed(host_sq=1e30, seed_sq=1e-30)], clock())
    s = expose(agg)
    assert math.isclose(get(s, "esper_grad_norm", run="r", group="host"), 1e15)
    assert math.isclose(get(s, "esper_grad_norm", run="r", group="seed"), 1e-15)


# --- both formats /metrics serves, by prometheus_client's parsers; its encoders as the oracle --


def _om_samples(text):
    """(name, type, help, samples) per family, by prometheus_client's strict OpenMetrics
    parser (it raises on anything the format forbids, a missing ``# EOF`` included)."""
    out = {}
    for f in parse_openmetrics(text):
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in f.samples
            if not s.name.endswith("_created")
        }
        out[f.name] = (f.type, f.documentation, samples)
    return out


def _text_samples(text):
    """(name, type, help, samples) per family, by prometheus_client's text parser."""
    out = {}
    for f in parse_text(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
        out[f.name] = (f.type, f.documentation, samples)
    return out


def _same(a, b):
    return a == b or (a != a and b != b)


def _comments(text):
    """The HELP and TYPE lines of an exposition, sorted."""
    return sorted(ln for ln in text.splitlines() if ln.startswith("#"))


def _busy_aggregator(make_agg, clock):
    agg, stats = make_agg()
    agg.apply_batch(
        [
            hello(run='q"\\x\n'),
            host_seed(run='q"\\x\n', host_sq=2.0),
            host_seed(run="b", host_sq=None),
            IsolationViolation("b", 0, 1.0, 1, "seed", "gradient", "e", 1.0),
            DeviceMismatch("b", 0, 1.0, "mixed", "seed", ("cpu", "cuda:0")),
            norms(
                run="inf",
                groups=[
                    gn("host", 16.0, "host", 400),
                    gn("seed", math.inf, "seed", 100, nonfinite=1),
                ],
            ),
            norms(
                run="nan",
                groups=[
                    gn("host", math.nan, "host", 400, nonfinite=1),
                    gn("seed", 4.0, "seed", 100),
                ],
            ),
            norms(run="big", step=10**12, groups=[gn("host", 1e300, "host", 10**15)]),
        ],
        clock(),
    )
    agg.apply_batch([heartbeat(run="b")._replace(seq=0)], clock())
    agg.apply_batch([heartbeat(run="b")._replace(seq=3)], clock())  # messages 1 and 2 lost
    agg.apply_batch([goodbye(run="b")], clock())
    stats.rejected["malformed"] += 2
    return agg


def _extra_registry():
    """Families the esper collector never makes: created, info, histogram, summary, inf, nan."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary

    reg = CollectorRegistry()
    Counter("t_events", 'c with \\ and "quotes"\nand a newline', ["a"], registry=reg).labels(
        'x"\\\n'
    ).inc(3)
    Gauge("t_inf", "g", registry=reg).set(math.inf)
    Gauge("t_minus_inf", "g", registry=reg).set(-math.inf)
    Gauge("t_nan", "g", registry=reg).set(math.nan)
    Gauge("t_tiny", "g", registry=reg).set(1.5e-300)
    Info("t_build", "i", registry=reg).info({"version": "1"})
    Histogram("t_seconds", "h", registry=reg).observe(0.3)
    Summary("t_size_bytes", "s", registry=reg).observe(7)
    return reg


def test_both_formats_of_a_scrape_carry_the_same_families_and_samples(make_agg, clock):
    agg = _busy_aggregator(make_agg, clock)
    scrape = Exposition(10**6, process_registry()).scrape(agg.snapshot())
    text, om = scrape.render(TEXT).decode(), scrape.render(OPENMETRICS).decode()
    assert om.endswith("\n# EOF\n") and om.count("# EOF") == 1 and "# EOF" not in text
    # The text format writes an info family as a gauge named x_info.
    from_om = {
        (f"{name}_info", "gauge") if typ == "info" else (name, typ): (doc, samples)
        for name, (typ, doc, samples) in _om_samples(om).items()
    }
    from_text = {(name, t): (doc, ss) for name, (t, doc, ss) in _text_samples(text).items()}
    assert from_text.keys() == from_om.keys() and len(from_om) > 30
    for key, (doc, samples) in from_om.items():
        text_doc, text_samples = from_text[key]
        assert text_doc == doc, key
        assert text_samples.keys() == samples.keys(), key
        assert all(_same(text_samples[k], samples[k]) for k in samples), key
    # Every run family is written with the type and help of its one declaration, and holds
    # the lines written for the runs, as many as the series cap counted.
    rows = [0] * len(RUN_FAMILIES)
    for _, _, lines in scrape.runs:
        for i, family_lines in enumerate(lines):
            rows[i] += family_lines.count("\n")
    for f, n in zip(RUN_FAMILIES, rows):
        doc, samples = from_om[(f.name, f.type)]
        assert doc == f.help and len(samples) == n, f.name
    assert sum(rows) == sum(n for _, n, _ in scrape.runs) > 60
    for name, value in (
        ("esper_grad_norm", math.sqrt(2.0)),
        ("esper_group_has_gradient", 1),
        ("esper_group_parameters", 400),
    ):
        assert from_om[(name, "gauge")][1][(name, (("group", "host"), ("run", 'q"\\x\n')))] == value
    assert from_om[("esper_grad_norm", "gauge")][1][
        ("esper_grad_norm", (("group", "host"), ("run", "big")))
    ] == math.sqrt(1e300)
    # Counters' samples end in _total; their family (TYPE line) does not in OpenMetrics.
    assert (
        "# TYPE esper_messages_lost counter\n" in om
        and 'esper_messages_lost_total{run="b",rank="0"} 2.0' in om
    )
    assert "# TYPE esper_daemon_build info\n" in om and "esper_daemon_build_info{" in om
    assert 'esper_grad_norm{run="q\\"\\\\x\\n",group="host"}' in om


def test_the_encoder_writes_what_prometheus_clients_own_writes_in_both_formats():
    fast_text = render(_extra_registry(), TEXT).decode()
    fast_om = render(_extra_registry(), OPENMETRICS).decode()
    reg = _extra_registry()
    slow_text, slow_om = generate_latest(reg).decode(), generate_openmetrics(reg).decode()
    assert fast_om.endswith("\n# EOF\n") and fast_om.count("# EOF") == 1
    fast, slow = _om_samples(fast_om), _om_samples(slow_om)
    assert fast.keys() == slow.keys() and len(fast) > 5
    for name in slow:
        (ft, fh, fs), (st, sh, ss) = fast[name], slow[name]
        assert (ft, fh) == (st, sh), name
        assert fs.keys() == ss.keys(), name
        assert all(_same(fs[k], ss[k]) for k in ss), name
    ft, st = parse(fast_text), parse(slow_text)
    assert ft.keys() == st.keys()
    assert all(
        _same(ft[k], st[k])
        for k in st  # creation times differ between registries
        if "_created" not in k[0]
    )
    assert _comments(fast_text) == _comments(slow_text)


def test_fast_text_of_a_scrape_passes_promtool_without_warnings(make_agg, clock):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (tools/ensure-prometheus.sh)")
    agg = _busy_aggregator(make_agg, clock)
    text = Exposition(10**6, process_registry()).scrape(agg.snapshot()).render(TEXT)
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout + proc.stderr
    )


def test_repeated_and_late_sharded_reports_are_counted_per_run(make_agg, clock):
    agg, _ = make_agg(shard_window_s=30.0)
    agg.apply_batch([hello(world_size=2)], clock())
    agg.apply_batch([host_seed(rank=0, step=1, host_sq=1.0, sharded=True)], clock())
    agg.apply_batch([host_seed(rank=0, step=1, host_sq=3.0, sharded=True)], clock())  # a repeat
    agg.apply_batch([host_seed(rank=1, step=1, host_sq=4.0, sharded=True)], clock())  # publishes
    agg.apply_batch([host_seed(rank=1, step=1, host_sq=4.0, sharded=True)], clock())  # late
    s = expose(agg)
    assert get(s, "esper_grad_norm", run="r", group="host") == math.sqrt(5.0)
    assert get(s, "esper_daemon_dropped_shard_reports_total", run="r") == 2
    assert get(s, "esper_daemon_incomplete_steps_total", run="r") == 0
