"""The receiver's backlog: frames moved out of libzmq while the decoder is behind.

libzmq holds about 8 KiB for each small message waiting in a peer's pipe; the backlog
holds the frame's bytes. These tests read its figures (bytes, frames, limit) and the order
in which a real PULL socket's messages reach the queue with part of them in the backlog
and the rest still in libzmq. The 4,096-connection job it was built for is in
``test_daemon_world_4096.py``.
"""

from __future__ import annotations

import zmq
import zmq.asyncio
from daemon_support import inproc_receiver

from esper_telemetry import Heartbeat, encode
from esper_telemetry.daemon import receiver
from esper_telemetry.daemon.queue import EventQueue
from esper_telemetry.daemon.receiver import BACKLOG_BYTES, Backlog, backlog_limit
from esper_telemetry.daemon.stats import DaemonStats


def test_the_limit_follows_the_open_descriptors_within_its_bounds():
    small = receiver._BACKLOG_MIN
    assert backlog_limit(12) == small  # a daemon with a few collectors
    assert backlog_limit(receiver._OWN_FDS + 100) == max(small, 100 * receiver._BACKLOG_PER_FD)
    assert backlog_limit(4_110) == (4_110 - receiver._OWN_FDS) * receiver._BACKLOG_PER_FD
    assert backlog_limit(4_110) > 60 << 20  # 4,096 collectors: about 80 small messages each
    assert backlog_limit(1_000_000) == BACKLOG_BYTES


def _pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"inproc://{name}")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(f"inproc://{name}")
    return pull, push


def test_fill_stops_at_its_limit_in_bytes_and_leaves_the_rest_to_libzmq():
    ctx = zmq.Context()
    pull, push = _pair(ctx, "fill")
    try:
        for i in range(1_000):
            push.send(i.to_bytes(4, "big") * 256)  # 1 KiB frames, numbered
        backlog = Backlog(limit=64 << 10)
        backlog.counted_at = float("inf")  # keep the limit given here
        moved = backlog.fill(pull)
        per_frame = 1024 + receiver._FRAME_OVERHEAD
        assert moved == -(-(64 << 10) // per_frame)  # until the limit is reached
        assert backlog.bytes == moved * per_frame
        assert backlog.bytes - per_frame < backlog.limit <= backlog.bytes
        assert backlog.fill(pull) == 0  # full: nothing more
        # Nothing lost, nothing reordered: the backlog's frames, then libzmq's.
        rest = []
        while pull.poll(100):
            rest.append(pull.recv())
        numbers = [int.from_bytes(f[:4], "big") for f in [*backlog.frames, *rest]]
        assert numbers == list(range(1_000))
    finally:
        pull.close(linger=0)
        push.close(linger=0)
        ctx.term()


def test_messages_reach_the_queue_in_order_across_the_backlog_and_libzmq():
    import asyncio

    async def run() -> tuple[list[int], int, int]:
        ctx = zmq.asyncio.Context()
        stats = DaemonStats()
        queue = EventQueue(100_000)
        rx = inproc_receiver(ctx, "order", queue, stats)
        push = zmq.Context.shadow(ctx.underlying).socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)  # libzmq holds what the receiver's mark leaves
        push.connect("inproc://order")
        n = 3 * receiver._FILL_MESSAGES  # more than one turn's fill and burst
        for seq in range(n):
            push.send(encode(Heartbeat("r", 0, 1.0, seq, 0, 0, 0), seq=seq))
        backlog = rx.backlogs[0]
        backlog.limit = 256 << 10  # more than a burst of these frames
        backlog.counted_at = float("inf")
        shadow = zmq.Socket.shadow(rx._sockets[0].underlying)
        seen_in_backlog = 0
        while stats.messages < n:
            rx._take(shadow, backlog)
            seen_in_backlog = max(seen_in_backlog, len(backlog))
        order = []
        while (events := queue.get()) is not None:
            order.extend(e.sent for e in events)
        push.close(linger=0)
        rx.close()
        ctx.term()
        return order, seen_in_backlog, backlog.bytes

    order, seen_in_backlog, left = asyncio.run(run())
    assert seen_in_backlog > 0  # some frames waited in the backlog between turns
    assert order == list(range(3 * receiver._FILL_MESSAGES))
    assert left == 0  # every frame decoded gave its bytes back
