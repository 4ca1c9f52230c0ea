"""The scrape path: the snapshot is taken on the event loop, the text rendered off it."""

from __future__ import annotations

import asyncio
import logging
import threading

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from esper_telemetry.daemon.web import WebServer
from esper_telemetry import encode
from daemon_support import get, host_seed, http_get, parse, wait_for


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

    def registry(snap):
        built.append((threading.get_ident(), snap))
        reg = CollectorRegistry()
        reg.register(_Fixed(snap))
        return reg

    web = WebServer("127.0.0.1", 0, "/metrics", snapshot, registry, lambda: True,
                    logging.getLogger("test.web"))
    host, port = await web.start()
    try:
        for expected in (1.0, 2.0):
            status, body, _ = await asyncio.to_thread(http_get, f"http://{host}:{port}/metrics")
            assert status == 200 and get(parse(body), "t_snapshot") == expected
    finally:
        await web.close()
    assert taken == [loop_thread, loop_thread]  # taken on the loop, once per scrape
    assert [snap for _, snap in built] == [1.0, 2.0]  # rendered from exactly that snapshot
    assert all(thread != loop_thread for thread, _ in built)  # ... off the loop


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
