"""The live page and its JSON API (daemon/page.py, daemon/api.py) on a real ``WebServer``.

The documents are read over HTTP from a server on a loopback port; their data comes from
a real aggregator's snapshot and from ``RunHistory`` records built with real ``StepRecord``s
(the provider ``Aggregator.history`` stands behind), checked against the values pushed.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import math
import threading
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from daemon_support import gn, hello, norms, web_bounds

from esper_telemetry.daemon import api
from esper_telemetry.daemon.page import MAX_IN_FLIGHT, STATIC_FILES, Pages
from esper_telemetry.daemon.steps import GroupHistory, RunHistory, StepRecord, StepRules
from esper_telemetry.daemon.web import WebServer
from esper_telemetry.daemon.webconfig import BasicAuth
from esper_telemetry.ratio import seed_ratio

INF, NAN = math.inf, math.nan


def group(
    name: str,
    role: str,
    params: int | None,
    values: list[tuple[int, float | None]],
    rules: StepRules | None = None,
    violations: tuple[int, ...] = (),
) -> GroupHistory:
    """A group's history as the aggregator reads it: ``values`` are (step, norm) pushed as
    sums of squares into a real StepRecord."""
    rec = StepRecord(rules or StepRules())
    for step, norm in values:
        rec.push(step, None if norm is None else norm * norm)
    for step in violations:
        rec.mark_violation(step)
    rec.settle(0)
    return GroupHistory(
        name,
        role,
        params,
        rec.points(),
        rec.folded(),
        list(rec.nonfinite_steps),
        list(rec.violation_steps),
        rec.spikes,
        rec.extremes(0),
        False,
        None,
    )


class Served:
    """A WebServer with Pages on a loopback port; ``get`` fetches a path (off the loop)."""

    def __init__(self, web: WebServer, pages: Pages, base: str) -> None:
        self.web, self.pages, self.base = web, pages, base

    async def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        def fetch() -> tuple[int, bytes, dict[str, str]]:
            req = urllib.request.Request(self.base + path, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, resp.read(), dict(resp.headers)
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read(), dict(exc.headers)

        return await asyncio.to_thread(fetch)

    async def json(self, path: str) -> tuple[int, Any]:
        status, body, headers = await self.get(path)
        assert headers["Content-Type"] == "application/json; charset=utf-8", headers
        return status, json.loads(body)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    started: list[WebServer] = []

    async def start(
        histories: dict[str, RunHistory] | None = None,
        snapshot: Callable[[], Any] = lambda: None,
        now: float = 1_700_000_010.0,
        auth: Any = None,
    ) -> Served:
        calls: list[int] = []

        def history(run: str) -> RunHistory | None:
            calls.append(threading.get_ident())
            return (histories or {}).get(run)

        pages = Pages(history, snapshot, "/metrics", clock=lambda: now)
        pages.calls = calls  # type: ignore[attr-defined]
        web = WebServer(
            "127.0.0.1",
            0,
            "/metrics",
            snapshot,
            lambda snap, fmt: b"",
            lambda: True,
            logging.getLogger("t.web"),
            auth=auth,
            pages=pages,
            **web_bounds(),
        )
        host, port = await web.start()
        started.append(web)
        return Served(web, pages, f"http://{host}:{port}")

    yield start
    for web in started:
        await web.close()


def _run(name: str = "r") -> RunHistory:
    host = [(s, 2.0 + s) for s in range(10)]
    seed = [(s, 0.5 * (s + 1)) for s in range(10)]
    seed[3] = (3, None)  # no gradient
    seed[5] = (5, INF)
    seed[7] = (7, NAN)
    return RunHistory(
        name,
        False,
        9,
        (
            group("host", "host", 400, host),
            group("seed", "seed", 100, seed, violations=(6, 8)),
            group("frozen", "group", 7, [(s, 1e-3) for s in range(2, 10)]),
        ),
    )


async def test_history_is_every_step_in_order_with_nonfinite_as_null_and_listed(serve):
    s = await serve({"r": _run()})
    status, doc = await s.json("/api/v1/runs/r/history")
    assert status == 200
    assert doc["run"] == "r" and doc["last_step"] == 9 and doc["ended"] is False
    assert doc["since"] is None and doc["host"] == "host"
    by = {g["name"]: g for g in doc["groups"]}
    assert [g["name"] for g in doc["groups"]] == ["host", "seed", "frozen"]
    assert by["host"]["points"] == [[s, 2.0 + s] for s in range(10)]
    assert by["host"]["role"] == "host" and by["host"]["params"] == 400
    seed = by["seed"]
    want = [[s, 0.5 * (s + 1)] for s in range(10)]
    want[3][1] = want[5][1] = want[7][1] = None
    assert seed["points"] == want
    # A null at a listed step is a non-finite gradient; any other null a step without one.
    assert seed["nonfinite"] == [5, 7] and by["host"]["nonfinite"] == []
    assert seed["violations"] == [6, 8] and by["host"]["violations"] == []
    assert by["frozen"]["points"][0] == [2, 1e-3] and by["frozen"]["first_step"] == 2
    # The seed's ratio by seed_ratio at every step both have; null where it is not finite.
    ratio = dict((step, r) for step, r in seed["ratio"])
    assert sorted(ratio) == list(range(10))
    for step in range(10):
        n = None if step in (3, 5, 7) else 0.5 * (step + 1)
        sq = {5: INF, 7: NAN}.get(step, None if n is None else n * n)
        want_r = seed_ratio(sq, 100, (2.0 + step) ** 2, 400)
        assert ratio[step] == (want_r if math.isfinite(want_r) else None), step
    assert ratio[3] == 0.0  # a seed without gradient has norm 0
    assert ratio[1] == pytest.approx((1.0 / 3.0) * 2.0, rel=1e-15)
    assert "ratio" not in by["host"] and "ratio" not in by["frozen"]
    assert s.pages.calls == [threading.get_ident()]  # the provider is called on the loop


async def test_since_and_last_send_what_a_poller_lacks_and_a_restart_replaces(serve):
    s = await serve({"r": _run()})
    _, doc = await s.json("/api/v1/runs/r/history?since=6")
    assert doc["since"] == 6
    by = {g["name"]: g for g in doc["groups"]}
    assert by["host"]["points"] == [[7, 9.0], [8, 10.0], [9, 11.0]]
    assert [step for step, _ in by["seed"]["ratio"]] == [7, 8, 9]
    assert by["seed"]["nonfinite"] == [5, 7]  # marks travel whole
    assert by["host"]["first_step"] == 0
    _, doc = await s.json("/api/v1/runs/r/history?last=2")
    assert [g["points"] for g in doc["groups"]][0] == [[8, 10.0], [9, 11.0]]
    # The run's latest step is below `since`: the collector started again; replace.
    _, doc = await s.json("/api/v1/runs/r/history?since=50")
    assert doc["since"] is None and len(doc["groups"][0]["points"]) == 10


async def test_folded_buckets_keep_a_spike_and_folded_since_sends_the_newer_ones(serve):
    rules = StepRules(history_steps=8, fold_steps=4, fold_buckets=8)
    values = [(s, 1.0) for s in range(40)]
    values[5] = (5, 1000.0)  # a spike, folded
    run = RunHistory("f", False, 39, (group("host", "host", 10, values, rules),))
    s = await serve({"f": run})
    _, doc = await s.json("/api/v1/runs/f/history")
    (g,) = doc["groups"]
    folded = g["folded"]
    assert folded[0][:2] == [0, 3] and folded[1] == [4, 7, 1.0, 1000.0]
    assert g["folded_from"] == 0
    assert [p[0] for p in g["points"]] == list(range(g["first_step"], 40))
    assert folded[-1][1] == g["first_step"] - 1  # folded and kept steps meet
    _, newer = await s.json(f"/api/v1/runs/f/history?since=39&folded_since={folded[-2][0] - 1}")
    (ng,) = newer["groups"]
    assert ng["points"] == [] and ng["folded"] == folded[-2:]


async def test_unknown_runs_paths_and_parameters_are_json_errors(serve):
    s = await serve({"r": _run()})
    status, doc = await s.json("/api/v1/runs/nope/history")
    assert status == 404 and doc == {"error": "unknown run", "run": "nope"}
    status, doc = await s.json("/api/v1/runs/r/other")
    assert status == 404 and doc["error"] == "no such API path"
    status, doc = await s.json("/api/v2/x")
    assert status == 404
    status, doc = await s.json("/api/v1/runs/r/history?since=abc")
    assert status == 400 and "since must be an integer" in doc["error"]
    status, doc = await s.json("/api/v1/runs/r/history?last=0")
    assert status == 400


async def test_names_travel_percent_encoded_and_come_back_as_they_were(serve):
    name = 'a/b <script>alert("x")</script> & ü ?#'
    s = await serve({name: _run(name)})
    status, doc = await s.json(f"/api/v1/runs/{urllib.parse.quote(name, safe='')}/history")
    assert status == 200 and doc["run"] == name


async def test_runs_document_reads_the_scrapes_snapshot(serve, make_agg):
    agg, _ = make_agg()
    decls = (("host", "host", 400, False), ("seed", "seed", 100, True))
    agg.apply(hello("a", decls=decls), 1.0)
    agg.apply(
        norms(
            "a",
            step=4,
            groups=(gn("host", 4.0, "host", 400), gn("seed", INF, "seed", 100, nonfinite=3)),
        ),
        1.0,
    )
    agg.apply(hello("b", decls=decls), 1.0)
    agg.apply(
        norms("b", step=7, groups=(gn("host", 1.0, "host", 400), gn("seed", 1.0, "seed", 100))),
        1.0,
    )
    # Ages by the daemon's clock: 10 s after run a's latest capture was applied.
    captured = {r.name: r.last_capture_time for r in agg.snapshot().runs}
    s = await serve(snapshot=agg.snapshot, now=captured["a"] + 10.0)
    status, doc = await s.json("/api/v1/runs")
    assert status == 200 and doc["time"] == captured["a"] + 10.0
    a, b = doc["runs"]
    assert (a["run"], b["run"]) == ("a", "b")
    assert a["last_step"] == 4 and b["last_step"] == 7
    assert a["nonfinite"] == 1 and b["nonfinite"] == 0
    assert a["age_seconds"] == pytest.approx(10.0) and a["ended"] is False
    assert a["groups"] == 2 and a["violations"] == 0 and a["violated_groups"] == []
    assert a["stale_groups"] == [] and a["dropped"] == 0 and a["lost_messages"] == 0


async def test_pages_and_static_files_come_from_the_package_with_a_strict_policy(serve):
    s = await serve()
    status, body, headers = await s.get("/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'href="./metrics"' in body and b"static/runs.js" in body and b"{{" not in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    status, body, _ = await s.get("/runs/any%2Fname")
    assert status == 200 and b"../static/run.js" in body
    for name, ctype in STATIC_FILES.items():
        status, body, headers = await s.get(f"/static/{name}")
        assert status == 200 and headers["Content-Type"] == ctype and len(body) > 100, name
    status, _, _ = await s.get("/static/../page.py")
    assert status == 404
    status, _, _ = await s.get("/static/nope.js")
    assert status == 404
    # What the page does not serve still reaches the web server's own paths.
    status, body, _ = await s.get("/-/healthy")
    assert status == 200 and body == b"Healthy.\n"


async def test_a_large_document_is_gzipped_when_asked(serve):
    values = [(s, 1.0 + s / 7) for s in range(1024)]
    run = RunHistory("big", False, 1023, (group("host", "host", 10, values),))
    s = await serve({"big": run})
    status, body, headers = await s.get("/api/v1/runs/big/history", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    doc = json.loads(gzip.decompress(body))
    assert doc["groups"][0]["points"][-1] == [1023, 1.0 + 1023 / 7]


async def test_documents_in_flight_are_bounded(serve):
    s = await serve({"r": _run()})
    s.pages.in_flight = MAX_IN_FLIGHT  # as if that many were being built or written
    status, body, headers = await s.get("/api/v1/runs/r/history")
    assert status == 503 and headers["Retry-After"] == "1" and s.pages.busy == 1
    s.pages.in_flight = 0
    status, _, _ = await s.get("/api/v1/runs/r/history")
    assert status == 200
    # The client may have the whole body before the handler has run past its write: its
    # count comes back to 0 a turn of the loop later (a leak would keep it at 1).
    for _ in range(200):
        if s.pages.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert s.pages.in_flight == 0


async def test_basic_auth_guards_the_page_and_the_api_like_the_metrics(serve):
    import bcrypt

    auth = BasicAuth({"alice": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4))})
    s = await serve({"r": _run()}, auth=auth)
    for path in ("/", "/runs/r", "/static/chart.js", "/api/v1/runs", "/api/v1/runs/r/history"):
        status, _, headers = await s.get(path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    status, body, _ = await s.get("/api/v1/runs/r/history", good)
    assert status == 200 and json.loads(body)["run"] == "r"
    bad = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
    status, _, _ = await s.get("/api/v1/runs/r/history", bad)
    assert status == 401


def test_groups_encoded_one_by_one_make_the_same_json_as_one_call():
    doc = api.history_document(_run())
    assert json.loads(api.encode(doc)) == json.loads(json.dumps(doc))
    assert api.encode({"time": 1.0, "runs": []}) == b'{"time":1.0,"runs":[]}'
    with pytest.raises(ValueError):
        api.encode({"groups": [{"x": NAN}]})
