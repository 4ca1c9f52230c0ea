"""The HTTP server as clients meet it: keep-alive, pipelining, bare-LF requests, gzip by
q-value with ``Vary``, a landing page with the version, a connection cap; and, on a real
daemon process, non-reading clients that cannot keep its memory or connections (RSS and
open descriptors read from /proc)."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import socket
import threading
import time

import procfs
import pytest
import zmq
from daemon_process import scrape_until, spawn
from daemon_support import get, gn, hello, norms, render, wait_for, web_bounds
from prometheus_client.core import GaugeMetricFamily

from esper_telemetry import encode
from esper_telemetry.daemon.web import HEADER_TIMEOUT_S, STALL_S, WebServer, accepts_gzip
from esper_telemetry.version import __version__


class _Gauges:
    def __init__(self, n: int, pad: str = "") -> None:
        self.n = n
        self.pad = pad

    def collect(self):
        g = GaugeMetricFamily("t_series", "many series", labels=["i"])
        for i in range(self.n):
            g.add_metric([f"{self.pad}{i}"], float(i))
        yield g


def _render(n: int, pad: str = ""):
    def make(_snap, fmt):
        return render(_Gauges(n, pad), fmt)

    return make


async def _server(n: int = 3, pad: str = "", **kw) -> WebServer:
    web = WebServer(
        "127.0.0.1",
        0,
        "/metrics",
        lambda: None,
        _render(n, pad),
        lambda: True,
        logging.getLogger("test.web"),
        **web_bounds(**kw),
    )
    web.bound = await web.start()  # type: ignore[attr-defined]
    return web


async def _exchange(addr, data: bytes, responses: int, timeout: float = 3.0) -> bytes:
    """Send ``data`` on one connection; read until ``responses`` complete answers arrived."""
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(data)
    got = b""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while got.count(b"HTTP/1.") < responses or not got.endswith((b"\n", b">")):
            left = deadline - asyncio.get_running_loop().time()
            chunk = await asyncio.wait_for(reader.read(65536), max(left, 0.01))
            if not chunk:
                break
            got += chunk
    except asyncio.TimeoutError:
        pass
    writer.close()
    return got


async def test_pipelined_requests_on_one_connection_are_all_answered_in_order():
    web = await _server()
    try:
        req = (
            b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /-/ready HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        got = await _exchange(web.bound, req, 3)
    finally:
        await web.close()
    assert got.count(b"HTTP/1.1 200 OK") == 3
    assert got.index(b"Healthy.") < got.index(b"Ready.") < got.index(b't_series{i="2"} 2.0')


async def test_keep_alive_serves_sequential_requests_on_one_connection():
    web = await _server()
    try:
        reader, writer = await asyncio.open_connection(*web.bound)
        statuses = []
        for _ in range(3):
            writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert b"Connection: close" not in head
            statuses.append(head.split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(len(b"Healthy.\n")), 3)
        writer.close()
    finally:
        await web.close()
    assert statuses == [b"HTTP/1.1 200 OK"] * 3


async def test_a_bare_lf_request_is_answered_at_once_not_waited_on():
    web = await _server()
    try:
        t0 = time.monotonic()
        got = await _exchange(web.bound, b"GET /-/healthy HTTP/1.1\nHost: x\n\n", 1, timeout=5)
        took = time.monotonic() - t0
    finally:
        await web.close()
    assert got.startswith(b"HTTP/1.") and took < 1.0, (got[:80], took)


@pytest.mark.parametrize(
    "header, gz",
    [
        ("gzip", True),
        ("gzip;q=0.5, identity", True),
        ("gzip;q=0", False),
        ("identity;q=1, gzip;q=0.0", False),
        ("*", True),
        ("*;q=0", False),
        ("br", False),
        ("GZIP;Q=0.3", True),
        ("*, gzip;q=0", False),
        ("", False),
    ],
)
def test_accept_encoding_q_values(header, gz):
    assert accepts_gzip(header) is gz


async def test_gzip_follows_q_values_and_every_scrape_says_vary():
    web = await _server(n=2000)
    host, port = web.bound
    try:

        async def scrape(enc):
            req = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: {enc}\r\n\r\n".encode()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(req)
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)).decode().lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            body = await asyncio.wait_for(reader.readexactly(length), 3)
            writer.close()
            return head, body

        head, body = await scrape("gzip;q=0")
        assert "content-encoding" not in head and "vary: accept, accept-encoding" in head
        assert b't_series{i="1999"} 1999.0' in body
        head, body = await scrape("identity;q=0.5, gzip;q=0.8")
        assert "content-encoding: gzip" in head and "vary: accept, accept-encoding" in head
        assert b't_series{i="1999"} 1999.0' in gzip.decompress(body)
    finally:
        await web.close()


async def test_landing_page_names_the_version_and_links_every_endpoint():
    web = await _server()
    try:
        got = await _exchange(web.bound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    finally:
        await web.close()
    page = got.decode()
    assert f"Version {__version__}" in page
    for link in ('href="/metrics"', 'href="/-/healthy"', 'href="/-/ready"'):
        assert link in page


async def test_past_the_cap_scrapes_get_503_health_checks_200_and_idle_slots_give_way():
    # Three scrapes in progress (their renders held) take every slot.
    hold = threading.Event()

    def held(snap, fmt):
        hold.wait(10)
        return render(_Gauges(3), fmt)

    web = WebServer(
        "127.0.0.1",
        0,
        "/metrics",
        lambda: None,
        held,
        lambda: True,
        logging.getLogger("test.web"),
        **web_bounds(max_connections=3),
    )
    addr = await web.start()
    scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        # Connections that send nothing wait in the lobby and take no slot.
        silent = [await asyncio.open_connection(*addr) for _ in range(20)]
        busy = [asyncio.create_task(_exchange(addr, scrape, 1, timeout=10.0)) for _ in range(3)]
        await wait_for(lambda: len(web._active) == 3, 5, "three scrapes in progress")
        assert web.connections == 3
        over = await _exchange(addr, scrape, 1)
        assert over.startswith(b"HTTP/1.1 503") and web.refused == 1
        # The health checks answer whatever the slots: a liveness probe must not fail.
        for path, text in ((b"/-/healthy", b"Healthy."), (b"/-/ready", b"Ready.")):
            got = await _exchange(addr, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", 1)
            assert got.startswith(b"HTTP/1.1 200") and text in got, got
        hold.set()
        for task in busy:
            assert (await task).startswith(b"HTTP/1.1 200")
        # The three connections are now idle between requests: a new scrape takes a slot.
        hold.clear()
        keep = [await asyncio.open_connection(*addr) for _ in range(3)]
        for reader, writer in keep:
            writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        await wait_for(lambda: web.connections == 3 and not web._active, 5, "three idle slots")
        hold.set()
        got = await _exchange(addr, scrape, 1)
        assert got.startswith(b"HTTP/1.1 200") and web.refused == 1
        for _, writer in silent + keep:
            writer.close()
    finally:
        hold.set()
        await web.close()


async def test_a_connection_that_sends_no_complete_request_is_closed_after_the_header_timeout():
    web = await _server()
    try:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*web.bound)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        got = await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_S + 5)
        took = time.monotonic() - started
        assert got == b"" and HEADER_TIMEOUT_S - 0.5 <= took <= HEADER_TIMEOUT_S + 2, took
        assert web.header_timeouts == 1
        writer.close()
    finally:
        await web.close()


# --- a real daemon process and non-reading clients -----------------------------------------


def _proc_figures(pid: int):
    """RSS in MiB and open descriptors of ``pid``."""
    return procfs.rss_bytes(pid) / 2**20, procfs.open_fds(pid)


def _non_reading_clients(pid: int, web: str, n: int, seconds: float, peak: float):
    """``n`` clients that ask for a scrape and never read a byte (each response waits in the
    daemon), held ``seconds``; the clients and the daemon's peak RSS (MiB) meanwhile."""
    host, port = web.rsplit(":", 1)
    clients = []
    for _ in range(n):
        c = socket.create_connection((host, int(port)))
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        clients.append(c)
        peak = max(peak, _proc_figures(pid)[0])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, _proc_figures(pid)[0])
        time.sleep(0.05)
    return clients, peak


@pytest.mark.slow
def test_non_reading_clients_are_cut_off_by_the_write_timeout_and_memory_comes_back():
    proc = spawn(
        "--zmq.listen-address=tcp://127.0.0.1:*",
        "--web.listen-address=127.0.0.1:0",
        "--web.write-timeout-seconds=1",
    )
    try:
        (endpoint,), web = started_or_listening(proc)
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(endpoint)
        # 40 runs x 100 groups with long names: an exposition of about 20,000 series, ~4 MB.
        for r in range(40):
            groups = [gn(f"group-{g:03d}-" + "x" * 60, 1.0 + g, params=10) for g in range(100)]
            push.send(encode(norms(run=f"run-{r:02d}-" + "y" * 60, groups=groups)))
        url = f"http://{web}/metrics"
        s = scrape_until(url, lambda s: get(s, "esper_daemon_runs") == 40, 20)
        assert get(s, "esper_daemon_runs") == 40
        base_rss, base_fds = _proc_figures(proc.pid)
        clients, peak = _non_reading_clients(proc.pid, web, 24, 0.8, base_rss)
        # Past the write timeout, with the clients still connected and still not reading:
        # the daemon has let go of them (descriptors) and of their responses (RSS).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rss, fds = _proc_figures(proc.pid)
            peak = max(peak, rss)
            if fds <= base_fds + 2 and rss < base_rss + 48:
                break
            time.sleep(0.1)
        print(
            f"RSS MiB: before {base_rss:.0f}, peak {peak:.0f}, after {rss:.0f}; "
            f"fds {base_fds}->{fds}"
        )
        assert peak < 512, f"peak RSS {peak:.0f} MiB"
        assert fds <= base_fds + 2, (fds, base_fds)
        assert rss < base_rss + 48, f"RSS {rss:.0f} MiB after, {base_rss:.0f} before"
        ok = scrape_until(url, lambda s: get(s, "esper_daemon_runs") == 40, 10)
        assert get(ok, "esper_daemon_runs") == 40
        for c in clients:
            c.close()
        push.close(0)
        ctx.term()
    finally:
        proc.terminate()
        proc.wait(15)


def started_or_listening(proc):
    """Where it listens, from the listening line (a warning may come first)."""
    for _ in range(5):
        line = proc.stderr.readline()
        m = re.search(r"zmq=(\S+) web=(\S+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep it draining
            return m.group(1).split(","), m.group(2)
    raise AssertionError(f"no listening line: {line!r}")


async def test_scrapes_past_the_bytes_of_bodies_in_flight_get_a_503_until_a_hog_stalls():
    # A body of about 10 MB (more than loopback's socket buffers take); bodies in flight
    # may hold 15 MB: one non-reading client's response is held, the next would pass it.
    web = await _server(n=40_000, pad="p" * 230, max_body_bytes=15_000_000, write_timeout_s=60.0)
    host, port = web.bound
    try:
        status, body = await asyncio.to_thread(_get, host, port)
        assert status == 200 and len(body) > 8_000_000 and web.busy == 0
        hog = socket.create_connection((host, port))
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        await wait_for(lambda: web._held > 0, 10, "the hog's body rendered")
        hogged = time.monotonic()
        status, _ = await asyncio.to_thread(_get, host, port)
        if time.monotonic() - hogged < STALL_S:  # a slow box may already be past it
            assert status == 503 and web.busy == 1
        # Once the hog has read nothing for STALL_S its response gives way: long before
        # the write timeout (60 s), scrapes are answered again.
        await wait_for_status(host, port, 200, STALL_S + 5.0)
        assert web.preempted == 1 and web.write_timeouts == 0
        hog.close()
    finally:
        await web.close()


def _get(host, port):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=20) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def wait_for_status(host, port, status, timeout):
    deadline = time.monotonic() + timeout
    while True:
        got, _ = await asyncio.to_thread(_get, host, port)
        if got == status:
            return
        assert time.monotonic() < deadline, f"still {got} after {timeout} s"
        await asyncio.sleep(0.1)


@pytest.mark.slow
def test_long_names_at_the_default_caps_and_non_reading_clients_stay_under_512_mib():
    """A run and group flood at the default caps, every name 250 characters long (about
    129,000 series, a 70 MB exposition without the series cap), then 24 clients that ask
    for a scrape and never read: the daemon's RSS stays under 512 MiB (880 MiB measured
    with the cap but without the bound on bodies in flight)."""
    proc = spawn(
        "--zmq.listen-address=tcp://127.0.0.1:*",
        "--web.listen-address=127.0.0.1:0",
        "--web.write-timeout-seconds=2",
    )
    try:
        (endpoint,), web = started_or_listening(proc)
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(endpoint)
        long = "x" * 240
        for r in range(100):
            run = f"{long}-run-{r:03d}"
            decls = [
                (f"{long}-g{g:03d}", "seed" if g else "host", 100, bool(g)) for g in range(128)
            ]
            push.send(
                encode(
                    [
                        hello(run=run, decls=decls),
                        norms(
                            run=run,
                            groups=[
                                gn(name, 1.0 + i, role, 100, isolated=iso)
                                for i, (name, role, _, iso) in enumerate(decls)
                            ],
                        ),
                    ]
                )
            )
        url = f"http://{web}/metrics"
        s = scrape_until(url, lambda s: get(s, "esper_daemon_runs") == 100, 60)
        assert get(s, "esper_daemon_runs") == 100
        assert len(s) <= 50_000 and get(s, "esper_daemon_scrape_omitted_series") > 70_000
        base_rss, _ = _proc_figures(proc.pid)
        clients, peak = _non_reading_clients(proc.pid, web, 24, 4, base_rss)
        print(f"RSS MiB: before {base_rss:.0f}, peak {peak:.0f}")
        assert peak < 512, f"peak RSS {peak:.0f} MiB"
        s = scrape_until(
            url, lambda s: (get(s, "esper_daemon_http_refused_total", reason="busy") or 0) > 0, 20
        )
        assert get(s, "esper_daemon_http_refused_total", reason="busy") > 0
        for c in clients:
            c.close()
        push.close(0)
        ctx.term()
    finally:
        proc.terminate()
        proc.wait(15)
