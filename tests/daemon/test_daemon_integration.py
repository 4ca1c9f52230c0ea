"""The wired daemon in-process, with real ZeroMQ sockets and HTTP on loopback random ports."""

from __future__ import annotations

import asyncio
import gzip
import random
import urllib.request

import msgpack
import pytest
import zmq
from daemon_support import get, hello, host_seed, wait_for

from esper_telemetry import REASONS, WireError, decode, encode
from esper_telemetry.defaults import MAX_MESSAGE_BYTES


def sent_all(running, n):
    return lambda: running.daemon.stats.messages >= n and len(running.daemon.queue) == 0


async def test_events_in_metrics_out_single_and_batched(start_daemon, push):
    d = await start_daemon()
    sock = push(d.endpoint)
    sock.send(encode(hello(world_size=1)))
    sock.send(encode([host_seed(step=s, host_sq=float(s * s)) for s in range(1, 5)]))
    await wait_for(lambda: d.daemon.stats.events == 5, 10, "5 events")
    s = await d.scrape()
    assert get(s, "esper_grad_norm", run="r", group="host") == 4.0
    assert get(s, "esper_captures_total", run="r") == 4
    assert get(s, "esper_last_step", run="r") == 4
    assert get(s, "esper_daemon_events_total") == 5
    assert get(s, "esper_daemon_messages_total") == 2
    assert get(s, "process_cpu_seconds_total") is not None


async def test_every_listen_address_ingests(start_daemon, push, tmp_path):
    ipc = f"ipc://{tmp_path}/esper.sock"
    d = await start_daemon(zmq_listen_addresses=("tcp://127.0.0.1:*", ipc))
    assert d.daemon.receiver.endpoints[1] == ipc
    push(d.daemon.receiver.endpoints[0]).send(encode(host_seed(run="tcp", host_sq=1.0)))
    push(ipc).send(encode(host_seed(run="ipc", host_sq=9.0)))
    await wait_for(lambda: d.daemon.stats.events == 2, 10, "both sockets")
    s = await d.scrape()
    assert get(s, "esper_grad_norm", run="tcp", group="host") == 1.0
    assert get(s, "esper_grad_norm", run="ipc", group="host") == 3.0


def _bad_frames(rng: random.Random, n: int):
    """Frames the codec must reject: random bytes, and near-misses of valid events."""
    good = msgpack.unpackb(encode(host_seed()), raw=False)
    frames = []
    for i in range(n):
        k = i % 6
        if k == 0:
            frames.append(rng.randbytes(rng.randint(1, 200)) + b"\xc1")  # 0xc1: never valid
        elif k == 1:
            frames.append(msgpack.packb({**good, "v": 99}))
        elif k == 2:
            frames.append(msgpack.packb({**good, "event": "nonsense"}))
        elif k == 3:
            frames.append(msgpack.packb({**good, "time": float("nan")}))
        elif k == 4:
            frames.append(msgpack.packb([good] * 5000))  # batch over the limit
        else:
            frames.append(msgpack.packb(rng.choice([1, "x", None, [], {}, 2.5])))
    return frames


async def test_a_flood_of_bad_frames_is_counted_and_a_good_collector_is_unharmed(
    start_daemon, push
):
    # Every frame is sent before the daemon (on this thread's loop) reads one: a receive
    # buffer that holds them all (the default holds 32 messages per sender).
    d = await start_daemon(
        zmq_receive_buffer_bytes=8 << 30, zmq_max_message_bytes=MAX_MESSAGE_BYTES
    )  # the codec's limits
    rng = random.Random(1234)
    bad, good = push(d.endpoint), push(d.endpoint)
    frames = _bad_frames(rng, 3000)
    expected = dict.fromkeys(REASONS, 0)  # the codec is the oracle for each frame's reason
    for frame in frames:
        with pytest.raises(WireError) as exc:
            decode(frame)
        expected[exc.value.reason] += 1
    assert min(expected.values()) >= 400  # every reason is exercised
    good.send(encode(hello()))
    for i, frame in enumerate(frames):
        bad.send(frame)
        if i % 100 == 0:
            good.send(encode(host_seed(step=i, host_sq=float(i))))
    good.send(encode(host_seed(step=10_000, host_sq=6.25, seed_sq=2.25)))
    await wait_for(sent_all(d, 3000 + 32), 20, "every frame received")
    s = await d.scrape()
    rejected = {r: get(s, "esper_daemon_rejected_total", reason=r) for r in REASONS}
    assert rejected == expected
    assert get(s, "esper_daemon_events_total") == 32
    assert get(s, "esper_grad_norm", run="r", group="host") == 2.5
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") == pytest.approx(1.2)
    assert get(s, "esper_captures_total", run="r") == 31
    assert (await d.get("/-/healthy"))[0] == 200


async def test_random_multipart_and_empty_frames_are_rejected_one_by_one(start_daemon, push):
    d = await start_daemon()
    sock = push(d.endpoint)
    sock.send_multipart([b"", b"\x90", encode(host_seed(host_sq=1.0))])
    await wait_for(sent_all(d, 3), 10, "three frames")
    s = await d.scrape()
    assert get(s, "esper_daemon_rejected_total", reason="malformed") == 2  # empty, empty batch
    assert get(s, "esper_daemon_events_total") == 1


async def test_a_message_that_does_not_fit_the_queue_is_dropped_and_counted(start_daemon, push):
    d = await start_daemon(queue_size=3)
    sock = push(d.endpoint)
    sock.send(encode([host_seed(step=s) for s in range(4)]))
    sock.send(encode([host_seed(step=s, host_sq=49.0) for s in range(3)]))
    await wait_for(sent_all(d, 2), 10, "two messages")
    s = await d.scrape()
    assert get(s, "esper_daemon_rejected_total", reason="queue_full") == 1
    assert get(s, "esper_daemon_events_total") == 3
    assert get(s, "esper_grad_norm", run="r", group="host") == 7.0


async def test_an_oversize_frame_is_refused_by_libzmq_and_the_daemon_stays_up(start_daemon, zctx):
    d = await start_daemon()
    big = zctx.socket(zmq.PUSH)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(d.endpoint)
    big.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    good = zctx.socket(zmq.PUSH)
    good.setsockopt(zmq.LINGER, 0)
    good.connect(d.endpoint)
    good.send(encode(host_seed(host_sq=0.25)))
    await wait_for(lambda: d.daemon.stats.events == 1, 10, "the good event")
    await asyncio.sleep(0.1)
    assert d.daemon.stats.messages == 1  # the oversize frame never reached Python
    assert get(await d.scrape(), "esper_grad_norm", run="r", group="host") == 0.5


async def test_http_endpoints(start_daemon):
    d = await start_daemon(telemetry_path="/custom")
    assert (await d.get("/-/healthy"))[:2] == (200, "Healthy.\n")
    assert (await d.get("/-/ready"))[:2] == (200, "Ready.\n")
    status, body, headers = await d.get("/custom")
    assert status == 200 and "esper_daemon_events_total 0.0" in body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert (await d.get("/metrics"))[0] == 404
    assert 'href="./custom"' in (await d.get("/"))[1]  # the live page's, relative

    def raw(method, headers=None):
        req = urllib.request.Request(d.base + "/custom", method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    status, body, _ = await asyncio.to_thread(raw, "HEAD")
    assert status == 200 and body == b""
    assert (await asyncio.to_thread(raw, "POST"))[0] == 405
    status, body, headers = await asyncio.to_thread(raw, "GET", {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert b"esper_daemon_events_total" in gzip.decompress(body)
    status, body, headers = await asyncio.to_thread(
        raw, "GET", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_malformed_http_requests_get_400_and_the_server_carries_on(start_daemon):
    d = await start_daemon()
    host, port = d.daemon.web_address.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    writer.write(b"NONSENSE\r\n\r\n")
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert line.startswith(b"HTTP/1.") and line.split()[1] == b"400"
    assert (await d.get("/-/healthy"))[0] == 200


async def test_shutdown_drains_the_queue(start_daemon):
    d = await start_daemon(queue_size=100_000)
    daemon = d.daemon
    for step in range(2000):  # queued behind the aggregator's back: it has not run yet
        assert daemon.queue.put([host_seed(step=step, host_sq=float(step))])
    await daemon.shutdown()
    assert daemon.stats.events == 2000 and len(daemon.queue) == 0
    assert daemon.aggregator.snapshot().runs[0].last_step == 1999


async def test_shutdown_gives_up_draining_at_the_deadline(start_daemon):
    d = await start_daemon(queue_size=1_000_000, shutdown_timeout_s=0.02)
    message = [host_seed()] * 1000
    for _ in range(300):  # 300,000 events: far more than 20 ms of work
        d.daemon.queue.put(message)
    t0 = asyncio.get_running_loop().time()
    await asyncio.wait_for(d.daemon.shutdown(), 5)
    assert len(d.daemon.queue) == 0  # what was left is dropped, and counted by message
    left = d.daemon.stats.rejected["shutdown"] * 1000
    assert left > 0 and d.daemon.stats.events + left == 300_000
    assert asyncio.get_running_loop().time() - t0 < 2.0


async def test_shutdown_stops_receiving_turns_unready_and_lingers_until_a_scrape(
    start_daemon, push
):
    d = await start_daemon(shutdown_linger_s=30.0)
    push(d.endpoint).send(encode(host_seed(host_sq=1.0)))
    await wait_for(lambda: d.daemon.stats.events == 1, 10, "one event")
    shutdown = asyncio.create_task(d.daemon.shutdown())
    await wait_for(lambda: not d.daemon.ready(), 5, "unready")
    assert (await d.get("/-/ready"))[0] == 503
    # Receiving stops once the sockets are drained (quiet): the PULL sockets are closed.
    await wait_for(lambda: d.daemon.receiver._sockets == [], 5, "sockets closed")
    assert not shutdown.done()
    s = await d.scrape()  # the last scrape ends the linger at once
    assert get(s, "esper_grad_norm", run="r", group="host") == 1.0
    await asyncio.wait_for(shutdown, 5)
