"""ZeroMQ ingest: one PULL socket per listen address, decoding into the bounded queue.

Each socket is a ``zmq.asyncio`` socket; after an awaited receive, the pump drains what is
already buffered with non-blocking receives on a synchronous shadow of the same socket
(no future per message), up to a burst, then yields so the aggregator can run. Every frame
is one message: decoded whole or rejected whole and counted by the ``WireError`` reason;
one collector's healthy ``Norms`` as columns when its captures differ only in their
values (``fastdecode.decode_columns``; a turn's lone captures of one sender are joined
first, each sender's messages kept in order), else by ``fastdecode.decode_norms``
(msgspec, several times faster than the codec), everything else by
``esper_telemetry.decode``, the contract, which also gives every rejection its reason.
Nothing that arrives can raise out of the pump.

What libzmq buffers is bounded in bytes per connected collector: ``ZMQ_MAXMSGSIZE``
(``--zmq.max-message-bytes``) refuses a larger frame before Python allocates it (libzmq
drops that sender's connection, and with it what its pipe held: those messages are not
counted here, they show up as gaps in the sender's message numbers), and the receive
high-water mark is ``--zmq.receive-buffer-bytes`` divided by it, in messages, so at most
that many bytes wait per peer. Beyond it libzmq pushes back on the sender, whose
non-blocking sends fail and are counted by its collector.

What libzmq holds also grows with the peers: about 24 KiB a connection, and 6 to 8.5 KiB
for each small message waiting in a pipe, so 4,096 collectors 100 messages ahead of the
daemon took it to 1.4 GiB. Each turn therefore first moves what libzmq holds into the
socket's ``Backlog``, the frames as bytes (about 200 bytes a small one), then decodes from
it, oldest first: a daemon behind thousands of collectors holds their messages compactly.
The backlog's limit follows the open descriptors (``backlog_limit``: 16 KiB each past 64,
from 64 KiB to ``BACKLOG_BYTES``), so with a few collectors, whose pipes the high-water
mark bounds, it stays small: a large one cost the 2-core ingest benchmark about a fifth of
its rate. Past the limit the frames stay in libzmq, whose high-water mark pushes back on
the senders.

At shutdown ``drain`` takes what the sockets and their backlogs hold until they are quiet
or the deadline passes, then disconnects every peer and counts what libzmq and the
backlogs still held as ``rejected{reason="shutdown"}``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

from esper_telemetry.codec import WireError, decode

from .fastdecode import columns, decode_columns, decode_norms
from .queue import EventQueue
from .stats import DaemonStats

__all__ = ["Backlog", "Receiver", "receive_hwm", "backlog_limit", "BACKLOG_BYTES"]

_log = logging.getLogger(__name__)

# Per wakeup, at most this many messages, events or bytes are handled before yielding to
# the loop. Bounded in events and bytes too: the aggregator must get its turn before the
# receiver can fill the queue (and memory) with one burst of large batches.
_BURST_MESSAGES = 512
_BURST_EVENTS = 4096
_BURST_BYTES = 4 << 20
# Frames moved out of libzmq a turn, at most (several bursts: the backlog grows faster than
# it is decoded while collectors are ahead, and libzmq's pipes empty).
_FILL_MESSAGES = 4 * _BURST_MESSAGES
# Frames held per socket between libzmq and the decoder, in bytes (each frame counted with
# ``_FRAME_OVERHEAD`` for its bytes object and deque slot), at most: 64 MiB is about 330,000
# small messages, a 4,096-rank job 80 steps ahead, which libzmq would hold in 2.6 GiB. The
# limit itself: 16 KiB per open descriptor past the daemon's own ``_OWN_FDS`` (with
# thousands, nearly all are collector connections), at least 64 KiB, counted again every
# _LIMIT_EVERY_S.
BACKLOG_BYTES = 64 << 20
_BACKLOG_PER_FD = 16 << 10
_BACKLOG_MIN = 64 << 10
_OWN_FDS = 64
_LIMIT_EVERY_S = 0.1
_FRAME_OVERHEAD = 48


def backlog_limit(open_fds: int) -> int:
    """The backlog's limit in bytes with ``open_fds`` descriptors open."""
    return max(_BACKLOG_MIN, min(BACKLOG_BYTES, (open_fds - _OWN_FDS) * _BACKLOG_PER_FD))


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: the smallest backlog
        return None


# A lone Norms capture, as ``encode`` writes it (a fixmap of 10, 9 or 8 keys, "v" and
# "event" first), alone or in a batch of one (a collector's): coalesced by sender.
_BATCH_OF_ONE = 0x91
_LONE_HEADS = tuple(
    lead + head + b"\xa1v" + bytes([v]) + b"\xa5event\xa5norms"
    for lead in (b"", bytes([_BATCH_OF_ONE]))
    for head, v in ((b"\x8a", 3), (b"\x89", 2), (b"\x88", 1))
)

_RUN_AT = 16  # after a lone head's lead: "run" follows "v" and "event"
_RUN_KEY = b"\xa3run"
_RANK_KEY = b"\xa4rank"
_TIME_KEY = b"\xa4time"


def _sender(msg: bytes) -> bytes | None:
    """What names a lone capture's sender: its run and rank as the bytes that encode them,
    when they are encoded canonically (the shortest form, as ``encode`` writes them), so
    one sender has one name whatever its frames' lead or schema; None otherwise (such a
    capture is taken alone, in its place). ``msg`` starts with one of ``_LONE_HEADS``."""
    at = _RUN_AT + (msg[0] == _BATCH_OF_ONE)
    start = at
    try:
        if msg[at : at + 4] != _RUN_KEY:
            return None
        at += 4
        head = msg[at]
        if 0xA0 <= head <= 0xBF:
            at += 1 + (head & 0x1F)
        elif head == 0xD9 and msg[at + 1] >= 32:
            at += 2 + msg[at + 1]
        elif head == 0xDA and msg[at + 1]:
            at += 3 + ((msg[at + 1] << 8) | msg[at + 2])
        else:
            return None
        if msg[at : at + 5] != _RANK_KEY:
            return None
        at += 5
        head = msg[at]
        if head < 0x80:
            at += 1
        elif head == 0xCC and msg[at + 1] >= 0x80:
            at += 2
        elif head == 0xCD and msg[at + 1]:
            at += 3
        elif head == 0xCE and (msg[at + 1] or msg[at + 2]):
            at += 5
        elif head == 0xCF and msg[at + 1 : at + 5] != b"\0\0\0\0" and msg[at + 1] < 0x80:
            at += 9
        else:
            return None
        if msg[at : at + 5] != _TIME_KEY:
            return None
    except IndexError:
        return None
    return msg[start:at]


# At shutdown, the sockets count as drained once nothing arrived for this long.
_QUIET_S = 0.1


def receive_hwm(receive_buffer_bytes: int, max_message_bytes: int) -> int:
    """The receive high-water mark, in messages, that holds at most ``receive_buffer_bytes``
    of messages of at most ``max_message_bytes`` per peer (at least 1)."""
    return max(1, receive_buffer_bytes // max_message_bytes)


class Backlog:
    """Frames taken out of one socket's libzmq pipes and not decoded yet, in order, at
    most ``limit`` bytes (with ``_FRAME_OVERHEAD`` each)."""

    __slots__ = ("frames", "bytes", "limit", "counted_at", "every")

    def __init__(self, limit: int = _BACKLOG_MIN) -> None:
        self.frames: deque[bytes] = deque()
        self.bytes = 0
        self.limit = limit
        self.counted_at = -math.inf
        self.every = _LIMIT_EVERY_S

    def __len__(self) -> int:
        return len(self.frames)

    def fill(self, shadow: zmq.Socket, first: bytes | None = None) -> int:
        """Move ``first`` (when given) and what ``shadow`` holds now into the backlog, up to
        its limit (counted again when older than ``_LIMIT_EVERY_S``, or 100 times what
        counting took) and
        ``_FILL_MESSAGES``; how many frames were moved."""
        frames = self.frames
        size = self.bytes
        n = 0
        if first is not None:
            frames.append(first)
            size += len(first) + _FRAME_OVERHEAD
            n = 1
        now = time.monotonic()
        if now - self.counted_at >= self.every:
            fds = _open_fds()
            self.limit = _BACKLOG_MIN if fds is None else backlog_limit(fds)
            self.counted_at = time.monotonic()
            # At most 1% of the time counting (65,536 descriptors take milliseconds).
            self.every = max(_LIMIT_EVERY_S, 100 * (self.counted_at - now))
        recv = shadow.recv
        noblock = zmq.NOBLOCK
        limit = self.limit
        while size < limit and n < _FILL_MESSAGES:
            try:
                msg = recv(noblock)
            except zmq.Again:
                break
            frames.append(msg)
            size += len(msg) + _FRAME_OVERHEAD
            n += 1
        self.bytes = size
        return n


class Receiver:
    """Binds PULL sockets on ``addresses`` and pumps decoded messages into ``queue``."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        addresses: Sequence[str],
        queue: EventQueue,
        stats: DaemonStats,
        logger: logging.Logger = _log,
        *,
        max_message_bytes: int,
        receive_buffer_bytes: int,
        secure: Callable[[zmq.asyncio.Socket], None] | None = None,
    ) -> None:
        # Called on each socket before it binds (daemon.curve: CURVE server and ZAP domain).
        self._secure = secure
        self._max_message_bytes = max_message_bytes
        self.hwm = receive_hwm(receive_buffer_bytes, max_message_bytes)
        self._context = context
        self._addresses = tuple(addresses)
        self._queue = queue
        self._stats = stats
        self._log = logger
        self._sockets: list[zmq.asyncio.Socket] = []
        self.backlogs: list[Backlog] = []  # one per socket, in the same order
        self.endpoints: list[str] = []  # as bound (a wildcard port resolved)

    def bind(self) -> list[str]:
        """Bind every address; raises ``zmq.ZMQError`` naming the endpoint on failure."""
        for address in self._addresses:
            sock = self._context.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
            sock.setsockopt(zmq.RCVHWM, self.hwm)
            sock.setsockopt(zmq.IPV6, 1)  # else libzmq refuses tcp://[ADDR]:PORT endpoints
            if self._secure is not None:
                self._secure(sock)
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                self.close()
                raise zmq.ZMQError(exc.errno, f"cannot bind {address}: {exc.strerror}") from None
            self._sockets.append(sock)
            self.backlogs.append(Backlog())
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.endpoints.append(endpoint)
        return list(self.endpoints)

    async def run(self) -> None:
        """Pump every socket until cancelled."""
        await asyncio.gather(*(self._pump(s, b) for s, b in zip(self._sockets, self.backlogs)))

    async def drain(self, apply: Callable[[int], int], deadline: float) -> int:
        """At shutdown, with ``run`` cancelled: receive what the sockets hold, ``apply``ing the
        queue (``apply(budget)``) as it goes, until nothing arrived for ``_QUIET_S`` or
        ``deadline`` (monotonic) passed; then disconnect every peer, count what libzmq still
        held as ``rejected{reason="shutdown"}``, and close. Returns that count.

        The listeners stay bound while draining: libzmq cannot stop accepting without also
        dropping the established connections, and with them what the kernel still buffers
        for them. Collectors that keep sending keep the sockets busy until the deadline.
        """
        shadows = [zmq.Socket.shadow(s.underlying) for s in self._sockets]
        quiet_since = time.monotonic()
        while shadows:
            now = time.monotonic()
            if now >= deadline:
                break
            got = 0
            for shadow, backlog in zip(shadows, self.backlogs):
                got += self._take(shadow, backlog)
            apply(2 * _BURST_EVENTS)
            if got:
                # Quiet is measured from the end of this turn: a turn that took longer than
                # _QUIET_S (a loaded machine) must not make the next empty look the last.
                quiet_since = time.monotonic()
            elif now - quiet_since >= _QUIET_S:
                break
            else:
                await asyncio.sleep(0.005)
        for sock, endpoint in zip(self._sockets, self.endpoints):
            try:
                sock.unbind(endpoint)  # disconnects its peers; their pipes stay readable
            except zmq.ZMQError:
                pass
        left = 0
        for backlog in self.backlogs:
            left += len(backlog)
            backlog.frames.clear()
            backlog.bytes = 0
        for shadow in shadows:
            while True:
                try:
                    shadow.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                left += 1
        self._stats.messages += left
        self._stats.rejected["shutdown"] += left
        self.close()
        return left

    def _take(self, shadow: zmq.Socket, backlog: Backlog, msg: bytes | None = None) -> int:
        """Move ``msg`` (when given) and what ``shadow`` holds into ``backlog`` (up to its
        limit), then decode and queue its frames, oldest first, and what ``shadow`` still
        holds, up to a burst. How many messages were decoded. The one decode-and-queue
        loop, for ``_pump`` and ``drain``: nothing that arrives can raise out of it.

        A lone ``Norms`` capture (what a collector sends when it keeps up) waits in
        ``lone`` with the others of its sender (the bytes before its time: its schema, run
        and rank) until the burst ends or another kind of message comes, then the sender's
        captures are decoded together (``_flush``). Each sender's messages keep their order;
        only different senders' may be applied in another order than they arrived, as
        another network would have delivered them.
        """
        frames = backlog.frames
        recv = shadow.recv
        noblock = zmq.NOBLOCK
        again = zmq.Again
        one = self._one
        lone: dict[bytes, list[bytes]] = {}
        heads = _LONE_HEADS
        # What libzmq holds first: into the backlog, compactly, up to its limit.
        backlog.fill(shadow, msg)
        if not frames:
            return 0
        msg = frames.popleft()
        held = len(msg) + _FRAME_OVERHEAD  # bytes of backlog frames decoded
        n = 0
        budget = _BURST_EVENTS
        size = 0
        try:
            while True:
                n += 1
                size += len(msg)
                sender = _sender(msg) if msg.startswith(heads) else None
                if sender is not None:
                    lone.setdefault(sender, []).append(msg)
                    budget -= 1
                else:
                    if lone:
                        waiting, lone = lone, {}  # taken once, whatever happens in _flush
                        self._flush(waiting)
                    budget -= one(msg)
                if n >= _BURST_MESSAGES or budget <= 0 or size >= _BURST_BYTES:
                    break
                if frames:
                    msg = frames.popleft()
                    held += len(msg) + _FRAME_OVERHEAD
                    continue
                try:
                    msg = recv(noblock)
                except again:
                    break
        finally:  # whatever stopped the turn (a socket closed under it): nothing taken is lost
            if lone:
                self._flush(lone)
            backlog.bytes -= held
            self._stats.messages += n
        return n

    def _one(self, msg: bytes) -> int:
        """Decode and queue one message (any kind); the events it held, 0 if rejected."""
        events = decode_columns(msg)
        if events is None:
            # The common message through the fast decoder; anything it does not vouch
            # for through the codec, which decides (and says why it rejects).
            events = decode_norms(msg)
            if events is None:
                try:
                    events = decode(msg)
                except WireError as exc:
                    self._stats.rejected[exc.reason] += 1
                    if self._log.isEnabledFor(logging.DEBUG):
                        self._log.debug("rejected a message of %d bytes: %s", len(msg), exc)
                    return 0
                except Exception:  # a codec bug; the codec promises only WireError
                    self._stats.rejected["internal"] += 1
                    self._log.exception("internal error decoding a message; it was dropped")
                    return 0
        if not self._queue.put(events):
            self._stats.rejected["queue_full"] += 1
        return len(events)

    def _flush(self, lone: dict[bytes, list[bytes]]) -> None:
        """Decode and queue the lone captures waiting, sender by sender, in order: runs of
        same-sized ones (a sender's captures change size only when a number grows a byte)
        as one ``Columns``; any that cannot be, one message at a time."""
        one = self._one
        put = self._queue.put
        for msgs in lone.values():
            if len(msgs) == 1:
                one(msgs[0])
                continue
            for _size, same in itertools.groupby(msgs, len):
                same = list(same)
                events = None
                if len(same) > 1:
                    lead = 1 if same[0][0] == _BATCH_OF_ONE else 0
                    events = columns(b"".join(same), len(same), lead, True)
                if events is None:
                    for msg in same:
                        one(msg)
                elif not put(events):
                    # Too many for the queue at once: as many messages as fit, in order.
                    rejected = self._stats.rejected
                    for event in events.events():
                        if not put((event,)):
                            rejected["queue_full"] += 1

    def close(self) -> None:
        """Close every socket at once, dropping what libzmq still buffers (linger 0)."""
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()

    async def _pump(self, sock: zmq.asyncio.Socket, backlog: Backlog) -> None:
        shadow = zmq.Socket.shadow(sock.underlying)
        take = self._take
        while True:
            if backlog.frames:
                take(shadow, backlog)
            else:
                take(shadow, backlog, await sock.recv())
            # An awaited recv that finds a message ready does not yield: do it here.
            await asyncio.sleep(0)
