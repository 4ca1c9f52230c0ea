"""The series cap of one scrape (issue 10, part 2): whole runs left out past
``--web.max-series``, live runs kept first, the daemon's own series always written, the
overflow counted and logged once.

Before the cap, the default run and group limits allowed a 150 MB exposition of 310,000
series; the last test runs a real daemon process past a small cap and reads the figures
from the scraped body: series in it, the overflow metrics, its size, the daemon's RSS.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter

import pytest
import zmq
from daemon_support import FakeClock, get, gn, goodbye, hello, host_seed, norms, parse
from live_daemon import LiveDaemon
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om

from esper_telemetry import DeviceMismatch, IsolationViolation, encode
from esper_telemetry.daemon.exporter import Exposition, process_registry
from esper_telemetry.daemon.snapshot import GroupSnapshot, RunSnapshot, Snapshot
from esper_telemetry.daemon.textformat import OPENMETRICS, TEXT

# --- how many series a run makes: what the cap counts is what the renderer writes ----------


def _groups():
    """Groups in every state the exporter tells apart."""
    for role, isolated, captured, sq, step, violations, vstep, stale, params in itertools.product(
        ("host", "seed", "group"),
        (False, True),
        (False, True),
        (None, 4.0, float("nan")),
        (-1, 3),
        ({}, {"gradient": 2}, {"other": 1}),
        (-1, 5),
        (False, True),
        (None, 10),
    ):
        yield GroupSnapshot(
            f"{role}", role, params, isolated, captured, sq, step, 0, dict(violations), vstep, stale
        )


def test_the_series_the_cap_counts_for_a_run_are_the_series_rendered_for_it():
    groups = list(_groups())
    empty = Snapshot((), 0, 0, {}, {}, 0, 0, messages_lost={})
    own = len(parse(Exposition(10**6).render(empty, TEXT).decode()))
    checked = 0
    for i in range(0, len(groups), 7):
        members = tuple(g._replace(name=f"g{j}") for j, g in enumerate(groups[i : i + 7]))
        runs, lost = [], {}
        for mismatch, last_step, ended, ranks in itertools.product(
            ({}, {"split": 1}, {"weird": 2}), (-1, 4), (False, True), ((), (0,), (0, 3))
        ):
            name = f"r{len(runs)}"
            runs.append(
                RunSnapshot(name, 3, last_step, 1.0, 1, 0, 0, dict(mismatch), members, ended)
            )
            lost.update({(name, rank): rank + 1 for rank in ranks})
        snap = Snapshot(tuple(runs), 0, 0, {}, {}, 0, 0, messages_lost=lost)
        scrape = Exposition(10**6).scrape(snap)
        counted = {run.name: n for run, n, _ in scrape.runs}
        text = scrape.render(TEXT).decode()
        written = Counter(re.findall(r'^[a-z_]+\{run="(r\d+)"', text, re.M))
        assert counted == written and len(written) == len(runs)
        # Room for the daemon's own series only: every run left out, each counted whole.
        figures = Exposition(own).scrape(snap).figures
        assert (figures.omitted_runs, figures.omitted_series) == (len(runs), written.total())
        checked += len(runs)
    assert checked > 1000


# --- which runs a capped scrape keeps -------------------------------------------------------


def _agg_with_runs(make_agg, clock):
    """Live runs with norms (a, b, c, in that order), one that never sent norms, one ended."""
    agg, stats = make_agg()
    for run in ("a", "b", "c"):
        agg.apply_batch([hello(run=run), host_seed(run=run)], clock())
    agg.apply_batch([hello(run="quiet")], clock())
    agg.apply_batch([hello(run="done"), host_seed(run="done"), goodbye(run="done")], clock())
    return agg


def _series_of(samples, run):
    return sum(1 for (_, labels) in samples if ("run", run) in labels)


def test_a_capped_scrape_keeps_whole_live_runs_held_longest_and_always_its_own(make_agg, clock):
    agg = _agg_with_runs(make_agg, clock)
    snap = agg.snapshot()._replace(queue_length=0, queue_capacity=10)
    full = parse(Exposition(10**6).render(snap, TEXT).decode())
    per_run = {r: _series_of(full, r) for r in ("a", "b", "c", "quiet", "done")}
    own = sum(1 for (_, labels) in full if not any(k == "run" for k, _ in labels))
    assert per_run["a"] == per_run["b"] == per_run["c"] == per_run["done"] > per_run["quiet"] > 0
    # Room for the daemon's own series, two live runs and the smaller one without norms.
    cap = own + 2 * per_run["a"] + per_run["quiet"]
    exposition = Exposition(cap)
    scrape = exposition.scrape(snap)
    for fmt in (TEXT, OPENMETRICS):
        body = scrape.render(fmt).decode()
        s = parse(body) if fmt == TEXT else parse(body.replace("# EOF\n", ""))
        assert len(s) <= cap
        shown = {r: _series_of(s, r) for r in per_run}
        # a and b, held longest, whole; c does not fit; quiet (no norms) fits in the rest.
        assert shown == {
            "a": per_run["a"],
            "b": per_run["b"],
            "c": 0,
            "quiet": per_run["quiet"],
            "done": 0,
        }
        assert get(s, "esper_daemon_scrape_omitted_runs") == 2
        assert get(s, "esper_daemon_scrape_omitted_series") == per_run["c"] + per_run["done"]
        assert get(s, "esper_daemon_scrapes_truncated_total") == 1
        assert get(s, "esper_daemon_runs") == 5  # the daemon's own series say what it holds
    assert exposition.truncated == 1
    # Room for the daemon's own series only: every run left out, nothing shown in part.
    s = parse(Exposition(own).scrape(snap).render(TEXT).decode())
    assert len(s) == own
    assert get(s, "esper_daemon_scrape_omitted_runs") == 5
    assert get(s, "esper_daemon_scrape_omitted_series") == sum(per_run.values())


def test_an_uncapped_scrape_says_nothing_was_left_out(make_agg, clock):
    agg = _agg_with_runs(make_agg, clock)
    exposition = Exposition(10**6)
    s = parse(exposition.scrape(agg.snapshot()).render(TEXT).decode())
    assert get(s, "esper_daemon_scrape_omitted_runs") == 0
    assert get(s, "esper_daemon_scrape_omitted_series") == 0
    assert get(s, "esper_daemon_scrapes_truncated_total") == 0
    assert exposition.truncated == 0


def test_truncation_is_logged_when_it_starts_then_at_most_every_reminder_and_when_it_ends(
    make_agg, clock, caplog
):
    agg = _agg_with_runs(make_agg, clock)
    snap = agg.snapshot()
    t = FakeClock()
    exposition = Exposition(100, logger=logging.getLogger("test.cap"), clock=t, remind_s=300)
    caplog.set_level(logging.INFO, "test.cap")
    for _ in range(50):  # a scrape every second for 50 s: one warning
        exposition.scrape(snap)
        t.advance(1)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert re.search(
        r"\d+ of 5 runs \(\d+ series\) over --web.max-series=100", caplog.records[0].getMessage()
    )
    t.advance(300)
    exposition.scrape(snap)  # still truncated after the reminder interval: said again
    assert len(caplog.records) == 2
    exposition.max_series = 10**6
    exposition.scrape(snap)
    exposition.scrape(snap)
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING", "INFO"]
    assert exposition.truncated == 51


def test_both_formats_of_a_scrape_carry_the_same_samples(make_agg, clock):
    agg, stats = make_agg()
    agg.apply_batch(
        [
            hello(run='q"\\x\n'),
            host_seed(run='q"\\x\n'),
            IsolationViolation("b", 0, 1.0, 1, "seed", "gradient", "e", 1.0),
            DeviceMismatch("b", 0, 1.0, "mixed", "seed", ("cpu", "cuda:0")),
            norms(
                run="n",
                groups=[
                    gn("host", float("nan"), "host", 400, nonfinite=1),
                    gn("seed", float("inf"), "seed", 100),
                ],
            ),
        ],
        clock(),
    )
    agg.apply_batch([heartbeat_seq()], clock())
    scrape = Exposition(10**6, process_registry()).scrape(agg.snapshot())
    fast = parse(scrape.render(TEXT).decode())
    # The strict OpenMetrics parser; the text writes an info family's sample as x_info too.
    slow = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in parse_om(scrape.render(OPENMETRICS).decode())
        for s in f.samples
    }
    assert len(fast) > 60 and fast.keys() == slow.keys()
    assert get(fast, "esper_grad_norm", run='q"\\x\n', group="host") == 4.0
    assert get(fast, "esper_grad_norm", run="n", group="seed") == float("inf")

    def same(a, b):
        return a == b or (a != a and b != b)  # NaN matches NaN

    assert all(same(fast[k], slow[k]) for k in slow)  # one scrape: the same process figures


def heartbeat_seq():
    from daemon_support import heartbeat

    return heartbeat(run="n")._replace(seq=0)


# --- a real daemon process past its cap -----------------------------------------------------

GROUPS = 40  # a host and 39 isolated seeds
DECLS = [("host", "host", 1000, False)] + [
    (f"seed-{i:02d}", "seed", 100, True) for i in range(GROUPS - 1)
]


def _norms(run: str):
    return norms(
        run=run,
        groups=[gn("host", 4.0, "host", 1000)]
        + [gn(f"seed-{i:02d}", 1.0 + i, "seed", 100, isolated=True) for i in range(GROUPS - 1)],
    )


def _proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.slow
def test_a_real_daemon_past_its_series_cap_leaves_whole_idle_runs_out_and_counts_them(tmp_path):
    cap = 10_000
    daemon = LiveDaemon(tmp_path / "daemon.log", f"--web.max-series={cap}")
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(daemon.endpoint)
        live = [f"live-{i:02d}" for i in range(30)]
        quiet = [f"quiet-{i:02d}" for i in range(10)]  # said hello, never sent norms
        done = [f"done-{i:02d}" for i in range(10)]  # sent norms, then every rank said goodbye
        for run in done:
            push.send(encode([hello(run=run, decls=DECLS), _norms(run), goodbye(run=run)]))
        for run in live:
            push.send(encode([hello(run=run, decls=DECLS), _norms(run)]))
        for run in quiet:
            push.send(encode([hello(run=run, decls=DECLS)]))
        push.close()
        s = daemon.scrape_until(lambda s: get(s, "esper_daemon_runs") == 50, "50 runs held")
        # As Prometheus asks (OpenMetrics first, gzip), and as text: the same cap.
        for accept in (
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            "text/plain",
        ):
            status, body, headers = http_get_with(daemon.url, accept)
            assert status == 200
            lines = [ln for ln in body.splitlines() if ln and not ln.startswith("#")]
            s = parse(body.replace("# EOF\n", ""))
            assert len(lines) == len(s) <= cap
            per_run = Counter(
                m.group(1) for ln in lines for m in [re.search(r'run="([^"]+)"', ln)] if m
            )
            # Whole runs only, every one of the same size, and only live ones.
            sizes = set(per_run.values())
            assert len(sizes) == 1, per_run
            (size,) = sizes
            shown = sorted(per_run)
            assert (
                shown == live[: len(shown)]
                and len(shown) == (cap - (len(s) - size * len(shown))) // size
            )
            omitted = 50 - len(shown)
            assert get(s, "esper_daemon_scrape_omitted_runs") == omitted
            # A run that never sent norms has no norm, step, ratio or isolation series.
            # Nor the window's extremes per group, nor a model norm.
            quiet_size = size - (2 + GROUPS * 3 + (GROUPS - 1) * 2 + GROUPS * 2 + 1)
            assert get(s, "esper_daemon_scrape_omitted_series") == (
                (len(live) - len(shown) + len(done)) * size + len(quiet) * quiet_size
            )
            assert get(s, "esper_daemon_runs") == 50 and get(s, "process_resident_memory_bytes")
            print(
                f"{headers.get('Content-Type')}: {len(lines)} series, {len(body)} bytes, "
                f"{len(shown)} of 50 runs"
            )
            assert len(body) < cap * 200
        truncated = get(s, "esper_daemon_scrapes_truncated_total")
        assert truncated >= 2
        assert _proc_rss_mib(daemon.proc.pid) < 512
        log = daemon.log_path.read_text()
        assert len(re.findall("scrapes leave runs out", log)) == 1, log[-2000:]
    finally:
        ctx.term()
        code = daemon.stop()
    assert code == 0, daemon.log()


def http_get_with(url: str, accept: str):
    import gzip
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": accept, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
        headers = dict(resp.headers)
    if headers.get("Content-Encoding") == "gzip":
        raw = gzip.decompress(raw)
    return resp.status, raw.decode(), headers
