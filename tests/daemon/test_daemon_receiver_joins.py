"""The receiver joins each sender's lone captures and keeps every sender's order.

A collector that keeps up sends one capture per message. Within a receive turn the receiver
puts each sender's lone ``Norms`` captures together and decodes them as one
``fastdecode.Columns``; only different senders' messages may come out in another order
than they arrived. These tests send through a real PULL socket (inproc) and read what
reaches the queue: order per sender, a ``Hello`` between captures, malformed and
mis-sized frames among them, and a full queue.
"""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio
from daemon_support import inproc_receiver

from esper_telemetry import GroupDecl, GroupNorm, Hello, Norms, encode
from esper_telemetry.daemon.fastdecode import Columns
from esper_telemetry.daemon.queue import EventQueue
from esper_telemetry.daemon.stats import DaemonStats

GROUPS = (
    GroupNorm("host", "host", 1000, 4.0, 0, False, False),
    GroupNorm("seed", "seed", 10, 0.25, 0, False, True),
)


def _capture(run: str, rank: int, step: int, seq: int, wrapped: bool = True) -> bytes:
    groups = tuple(g._replace(sq=step / 3) for g in GROUPS)
    event = Norms(run, rank, 1.0 + step, step, False, groups, 4)
    return encode([event] if wrapped else event, seq=seq)


def _hello(run: str, rank: int, seq: int) -> bytes:
    decl = tuple(GroupDecl(g.name, g.role, g.params, g.isolated) for g in GROUPS)
    return encode(Hello(run, rank, 1.0, 4, "host", 1, "0", "0", decl), seq=seq)


def _through(frames: list[bytes], capacity: int = 100_000):
    """Send ``frames`` through a real PULL socket; what reached the queue, the stats and
    the number of queue items."""

    async def run():
        ctx = zmq.asyncio.Context()
        stats = DaemonStats()
        queue = EventQueue(capacity)
        rx = inproc_receiver(ctx, "joins", queue, stats)
        push = zmq.Context.shadow(ctx.underlying).socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect("inproc://joins")
        for frame in frames:
            push.send(frame)
        backlog = rx.backlogs[0]
        backlog.limit = 64 << 20  # the whole lot in one turn's reach
        backlog.counted_at = float("inf")
        shadow = zmq.Socket.shadow(rx._sockets[0].underlying)
        while stats.messages < len(frames):
            rx._take(shadow, backlog)
        items = []
        while (events := queue.get()) is not None:
            items.append(events)
        push.close(linger=0)
        rx.close()
        ctx.term()
        return items, stats

    return asyncio.run(run())


def _messages(items):
    """(run, rank, kind, seq) of every message that reached the queue, in queue order."""
    out = []
    for events in items:
        if type(events) is Columns:
            first = events.first
            seqs = events.seqs if events.seqs is not None else [first.seq] * len(events)
            out.extend((first.run, first.rank, "norms", seq) for seq in seqs)
        else:
            e = events[0]
            out.append((e.run, e.rank, "hello" if type(e) is Hello else "norms", e.seq))
    return out


def test_each_senders_lone_captures_are_joined_and_stay_in_order():
    frames = []
    for i in range(120):
        for rank in range(3):  # three ranks' messages interleaved, as PULL fair-queues them
            frames.append(_capture("a", rank, 1000 + i, 500 + i, wrapped=rank != 2))
    items, stats = _through(frames)
    got = _messages(items)
    assert stats.messages == len(frames) and sum(stats.rejected.values()) == 0
    assert sorted(got) == sorted(
        ("a", rank, "norms", 500 + i) for i in range(120) for rank in range(3)
    )
    for rank in range(3):
        assert [m[3] for m in got if m[1] == rank] == list(range(500, 620))
    joined = [events for events in items if type(events) is Columns]
    assert sum(events.messages for events in joined) == len(frames)
    assert len(items) < len(frames) / 20  # joined, not one item per message


def test_a_hello_and_odd_frames_between_captures_keep_their_place_in_the_senders_order():
    frames = [_capture("b", 0, 10 + i, i) for i in range(40)]
    frames.insert(20, _hello("b", 0, 1000))  # the sender attached anew
    frames.insert(30, b"\x91\x8a\xa1v\x03\xa5event\xa5norms" + b"\x00" * 40)  # malformed
    frames.insert(5, _capture("b", 0, 100_000, 7))  # a wider step: another size, same sender
    items, stats = _through(frames)
    got = _messages(items)
    assert stats.messages == len(frames)
    assert stats.rejected["malformed"] + stats.rejected["schema"] == 1
    order = [(m[2], m[3]) for m in got]
    expected = (
        [("norms", i) for i in range(5)] + [("norms", 7)] + [("norms", i) for i in range(5, 20)]
    )
    expected += [("hello", 1000)] + [("norms", i) for i in range(20, 40)]
    assert order == expected


def test_joined_captures_refused_by_a_full_queue_are_counted_one_message_each():
    frames = [_capture("c", 0, 10 + i, i) for i in range(50)]
    items, stats = _through(frames, capacity=30)
    got = _messages(items)
    assert [m[3] for m in got] == list(range(30))  # as many as fit, in order
    assert stats.rejected["queue_full"] == 20


def _v2_capture(run: str, rank: int, step: int, seq: int) -> bytes:
    import msgpack

    groups = [[g.name, g.role, g.params, step / 3, 0, False, g.isolated] for g in GROUPS]
    wire = {"v": 2, "event": "norms", "run": run, "rank": rank, "time": 1.0 + step}
    wire.update(step=step, skipped=False, groups=groups, seq=seq)
    return msgpack.packb([wire])


def test_one_senders_captures_written_in_several_ways_keep_their_order():
    # A sender's frames may differ before their time: with or without the batch-of-one
    # byte, another schema, a rank written in a longer form than needed (valid msgpack),
    # a run name whose time comes past byte 512. Whatever a frame's form, the sender's
    # messages are applied in the order they arrived.
    long_run = "é" * 250
    odd_rank = _capture("d", 0, 12, 2).replace(b"\xa4rank\x00", b"\xa4rank\xcc\x00")
    cases = {
        "lead": [_capture("d", 0, 11, 1), _capture("d", 0, 12, 2, wrapped=False)],
        "schema": [_capture("d", 0, 11, 1), _v2_capture("d", 0, 12, 2)],
        "rank form": [_capture("d", 0, 11, 1), odd_rank],
        "long run": [_capture(long_run, 0, 11, 1), _capture(long_run, 0, 12, 2, wrapped=False)],
    }
    for case, (first, second) in cases.items():
        run = long_run if case == "long run" else "d"
        frames = [first, second, _capture(run, 0, 13, 3), _capture(run, 0, 14, 4)]
        items, stats = _through(frames)
        assert sum(stats.rejected.values()) == 0, case
        assert [m[3] for m in _messages(items)] == [1, 2, 3, 4], case


def test_lone_captures_taken_before_the_socket_fails_are_queued_not_lost():
    # A turn that stops on an error from the socket (closed under it at shutdown) still
    # queues the lone captures it had taken, and counts them.
    from esper_telemetry.daemon.receiver import Backlog, Receiver

    frames = [_capture("f", 0, 10 + i, i) for i in range(4)]

    class Failing:
        def __init__(self) -> None:
            self.left = list(frames[1:])

        def recv(self, flags=0):
            if self.left:
                return self.left.pop(0)
            raise zmq.ZMQError(zmq.ETERM)

    stats = DaemonStats()
    queue = EventQueue(1000)
    rx = Receiver(None, [], queue, stats, max_message_bytes=1 << 18, receive_buffer_bytes=1 << 25)
    backlog = Backlog(limit=0)
    backlog.counted_at = float("inf")  # no descriptors counted: nothing moved in by fill
    backlog.frames.append(frames[0])
    try:
        rx._take(Failing(), backlog)
    except zmq.ZMQError:
        pass
    else:
        raise AssertionError("the socket's error is not swallowed")
    got = []
    while (events := queue.get()) is not None:
        got.append(events)
    assert [m[3] for m in _messages(got)] == [0, 1, 2, 3]
    assert stats.messages == 4
