"""A raw peer streaming a multipart message that never ends (issue 20, item 5), against a
real daemon process on loopback: libzmq holds every frame of it (none is delivered before
the last, and the high-water mark counts only whole messages), so before, RSS went from 43
to 1,548 MiB in 1.6 s. Now the memory guard drops that connection whenever the resident
memory passes --limits.memory-bytes: RSS read from /proc stays bounded, a collector
sending meanwhile keeps its connection, and the drops are counted."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import zmq
from daemon_support import get
from live_daemon import LiveDaemon

from esper_telemetry import Heartbeat, encode

pytestmark = pytest.mark.slow

LIMIT = 256 << 20
# Stream three times what the daemon may hold (a minute at most on a slow box).
STREAM_BYTES = 3 * LIMIT
STREAM_S = 60.0
FRAME = b"\x00" * (60 << 10)  # under --zmq.max-message-bytes (256 KiB)
# Past the limit the guard drops a connection within two looks (0.1 s): the stream adds
# what it sends meanwhile (about 1 GB/s at most on loopback), then the heap is trimmed.
OVERSHOOT = 256 << 20


def zmtp_push(host: str, port: int) -> socket.socket:
    """A raw TCP peer that speaks ZMTP 3.0 as a PUSH socket (NULL security): libzmq's own
    PUSH would hold the frames of an unfinished message on its side."""
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(
        b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32)
    )
    greeting = b""
    while len(greeting) < 64:
        chunk = s.recv(64 - len(greeting))
        assert chunk, "the daemon closed the connection during the greeting"
        greeting += chunk
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"
    s.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return s


def stream_forever(endpoint: str, stop: threading.Event, sent: list) -> None:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    host = host.strip("[]").removeprefix("::ffff:")
    more = b"\x03" + struct.pack(">Q", len(FRAME)) + FRAME  # MORE | LONG: never the last
    while not stop.is_set():
        s = zmtp_push(host, int(port))
        try:
            while not stop.is_set():
                s.sendall(more * 16)
                sent[0] += 16 * len(FRAME)
        except OSError:  # the daemon dropped it: connect again and start over
            pass
        finally:
            s.close()


def collect(endpoint: str, stop: threading.Event, sent: list) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    try:
        while not stop.wait(0.01):
            sock.send(encode(Heartbeat("real", 0, 1.0, sent[0], 0, 0, 0), seq=sent[0]))
            sent[0] += 1
    finally:
        sock.close()
        ctx.term()


def test_a_never_ending_multipart_message_cannot_take_the_daemons_memory(tmp_path):
    d = LiveDaemon(tmp_path / "d.log", f"--limits.memory-bytes={LIMIT}")
    stop = threading.Event()
    streamed, collected = [0], [0]
    threads = [
        threading.Thread(target=stream_forever, args=(d.endpoint, stop, streamed)),
        threading.Thread(target=collect, args=(d.endpoint, stop, collected)),
    ]
    try:
        base = d.rss_bytes()
        for t in threads:
            t.start()
        peak = base
        started = time.monotonic()
        while time.monotonic() < started + STREAM_S and streamed[0] < STREAM_BYTES:
            peak = max(peak, d.rss_bytes())
            time.sleep(0.005)
        took = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(10)
        s = d.scrape_until(
            lambda s: get(s, "esper_daemon_events_total") == collected[0],
            "every heartbeat of the collector",
        )
        after = d.rss_bytes()
    finally:
        stop.set()
        code = d.stop()
    assert code == 0, d.log()
    print(
        f"streamed {streamed[0] / 2**20:.0f} MiB of one multipart message in {took:.1f} s: "
        f"RSS {base / 2**20:.0f} -> peak {peak / 2**20:.0f} -> {after / 2**20:.0f} MiB "
        f"(limit {LIMIT >> 20} MiB); drops: "
        f"{get(s, 'esper_daemon_memory_sheds_total', what='connection'):.0f} of the streamer, "
        f"{get(s, 'esper_daemon_memory_sheds_total', what='all'):.0f} of all"
    )
    assert streamed[0] >= STREAM_BYTES  # more than the daemon may hold, three times
    assert peak < LIMIT + OVERSHOOT
    assert get(s, "esper_daemon_memory_sheds_total", what="connection") >= 2
    # The collector kept its connection: the streamer was the one dropped each time.
    assert get(s, "esper_daemon_memory_sheds_total", what="all") == 0
    assert get(s, "esper_messages_lost_total", run="real", rank="0") == 0
