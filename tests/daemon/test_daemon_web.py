"""The scrape path: the snapshot is taken on the event loop, the text rendered off it."""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
import urllib.request

import pytest
from daemon_support import (
    get,
    gn,
    host_seed,
    http_get,
    norms,
    parse,
    render,
    wait_for,
    web_bounds,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from esper_telemetry import encode
from esper_telemetry.daemon.textformat import (
    CONTENT_TYPE,
    OPENMETRICS,
    OPENMETRICS_CONTENT_TYPE,
    TEXT,
    negotiate,
)
from esper_telemetry.daemon.web import WebServer


class _Fixed:
    """A collector of one gauge whose value is the snapshot it was built from."""

    def __init__(self, value: float) -> None:
        self.value = value

    def collect(self):
        yield GaugeMetricFamily("t_snapshot", "the snapshot's value", value=self.value)


async def test_each_scrape_renders_the_snapshot_taken_on_the_loop_on_another_thread():
    loop_thread = threading.get_ident()
    taken, built = [], []

    def snapshot():
        taken.append(threading.get_ident())
        return float(len(taken))  # a new value per scrape

    def rendering(snap, fmt):
        built.append((threading.get_ident(), snap, fmt))
        return render(_Fixed(snap), fmt)

    web = WebServer(
        "127.0.0.1",
        0,
        "/metrics",
        snapshot,
        rendering,
        lambda: True,
        logging.getLogger("t.web"),
        **web_bounds(),
    )
    host, port = await web.start()
    try:
        status, body, headers = await asyncio.to_thread(http_get, f"http://{host}:{port}/metrics")
        assert status == 200 and get(parse(body), "t_snapshot") == 1.0
        assert headers["Content-Type"] == CONTENT_TYPE
        raw, headers = await _fetch(f"http://{host}:{port}/metrics", PROMETHEUS_2, "identity")
        assert headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
        (family,) = parse_openmetrics(raw.decode())  # strict: the body is OpenMetrics
        assert family.samples[0].value == 2.0
    finally:
        await web.close()
    assert taken == [loop_thread, loop_thread]  # taken on the loop, once per scrape
    # Rendered from exactly that snapshot, in the format the content type says.
    assert [(snap, fmt) for _, snap, fmt in built] == [(1.0, TEXT), (2.0, OPENMETRICS)]
    assert all(thread != loop_thread for thread, _, _ in built)  # ... off the loop


async def test_a_daemon_scrape_takes_the_aggregators_snapshot_on_the_loop(start_daemon, push):
    d = await start_daemon(process_metrics=False)
    loop_thread = threading.get_ident()
    agg = d.daemon.aggregator
    threads = []
    real = agg.snapshot

    def recording():
        threads.append(threading.get_ident())
        return real()

    agg.snapshot = recording  # type: ignore[method-assign]
    push(d.endpoint).send(encode(host_seed(host_sq=6.25)))
    await wait_for(lambda: d.daemon.stats.events == 1, 10, "one event")
    s = await d.scrape()
    assert get(s, "esper_grad_norm", run="r", group="host") == 2.5
    assert get(s, "esper_daemon_queue_capacity") == d.daemon.config.queue_size
    assert threads == [loop_thread]


# --- format negotiation: what a scraper asks for, by q-value ---------------------------------

PROMETHEUS_2 = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


@pytest.mark.parametrize(
    "accept, fmt",
    [
        (PROMETHEUS_2, "openmetrics"),
        (PROMETHEUS_3, "openmetrics"),
        ("text/plain;version=0.0.4", "text"),
        ("", "text"),
        (None, "text"),
        ("*/*", "text"),  # a tie: text, which every client reads
        ("application/openmetrics-text;version=1.0.0;q=0.2,text/plain;q=0.9", "text"),
        ("application/openmetrics-text", "openmetrics"),
        ("application/openmetrics-text;version=0.0.1", "text"),  # a version not written here
        ("application/openmetrics-text;version=2.0.0, */*;q=0.1", "text"),
        ("application/openmetrics-text;q=0, */*", "text"),
        ("text/plain;q=0, application/openmetrics-text;q=0.1", "openmetrics"),
        ("text/plain;q=0, */*;q=0.5", "openmetrics"),  # the specific range refuses text
        ("application/*", "openmetrics"),
        ("text/*;q=0.3, application/*;q=0.2", "text"),
        ("application/json", "text"),  # nothing acceptable: text rather than a 406
        ("APPLICATION/OPENMETRICS-TEXT; Q=0.9, text/plain; q=0.8", "openmetrics"),
        ("application/openmetrics-text;q=bogus, text/plain;q=0.1", "text"),
    ],
)
def test_negotiation_follows_q_values(accept, fmt):
    got, ctype = negotiate(accept)
    assert got == fmt
    assert ctype == (OPENMETRICS_CONTENT_TYPE if fmt == "openmetrics" else CONTENT_TYPE)


async def _fetch(url: str, accept: str, encoding: str):
    req = urllib.request.Request(url, headers={"Accept": accept, "Accept-Encoding": encoding})

    def get_():
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read(), dict(resp.headers)

    return await asyncio.to_thread(get_)


async def test_a_daemon_answers_prometheus_in_openmetrics_and_others_in_text_gzip_as_asked(
    start_daemon, push
):
    d = await start_daemon()
    push(d.endpoint).send(
        encode(
            norms(
                run='we"ird\\run\n',
                groups=[
                    gn("host", 6.25, "host", 400),
                    gn("seed", float("inf"), "seed", 100, nonfinite=1),
                ],
            )
        )
    )
    await wait_for(lambda: d.daemon.stats.events == 1, 10, "one event")
    url = d.base + "/metrics"
    seen = {}
    for accept, encoding in (
        (PROMETHEUS_2, "gzip"),
        (PROMETHEUS_2, "identity"),
        ("text/plain;version=0.0.4", "gzip;q=0.5"),
        ("", ""),
    ):
        raw, headers = await _fetch(url, accept, encoding)
        assert headers["Vary"] == "Accept, Accept-Encoding"
        if "gzip" in encoding:
            assert headers["Content-Encoding"] == "gzip"
            raw = gzip.decompress(raw)
        else:
            assert "Content-Encoding" not in headers
        body = raw.decode()
        if accept == PROMETHEUS_2:
            assert headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
            assert body.endswith("\n# EOF\n") and body.count("# EOF") == 1
            assert "# TYPE esper_captures counter\n" in body  # a counter's family: no _total
            families = {f.name: f for f in parse_openmetrics(body)}  # strict: raises if not
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in families.values()
                for s in f.samples
            }
            assert families["esper_daemon_build"].type == "info"
        else:
            assert headers["Content-Type"] == CONTENT_TYPE
            assert "# TYPE esper_captures_total counter\n" in body and "# EOF" not in body
            samples = parse(body)
        key = ("esper_grad_norm", (("group", "host"), ("run", 'we"ird\\run\n')))
        assert samples[key] == 2.5
        assert samples[
            ("esper_seed_grad_ratio", (("run", 'we"ird\\run\n'), ("seed", "seed")))
        ] == float("inf")
        assert samples[("esper_captures_total", (("run", 'we"ird\\run\n'),))] == 1
        seen[accept] = {k for k in samples if not k[0].startswith(("process_", "python_"))}
    # The same series whatever the format (the daemon's own counters may have moved).
    assert seen[PROMETHEUS_2] == seen["text/plain;version=0.0.4"] == seen[""]
