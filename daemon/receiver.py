"""ZeroMQ ingest: one PULL socket per listen address, decoding into the bounded queue.

Each socket is a ``zmq.asyncio`` socket; after an awaited receive, the pump drains what is
already buffered with non-blocking receives on a synchronous shadow of the same socket
(no future per message), up to a burst, then yields so the aggregator can run. Every frame
is one message: decoded whole or rejected whole and counted by the ``WireError`` reason;
one collector's healthy ``Norms`` by ``fastdecode.decode_norms`` (msgspec, several times
faster), everything else by ``esper_telemetry.decode``, the contract, which also gives
every rejection its reason. Nothing that arrives can raise out of the pump.

What libzmq buffers is bounded in bytes per connected collector: ``ZMQ_MAXMSGSIZE``
(``--zmq.max-message-bytes``) refuses a larger frame before Python allocates it (libzmq
drops that sender's connection, and with it what its pipe held: those messages are not
counted here, they show up as gaps in the sender's message numbers), and the receive
high-water mark is ``--zmq.receive-buffer-bytes`` divided by it, in messages, so at most
that many bytes wait per peer. Beyond it libzmq pushes back on the sender, whose
non-blocking sends fail and are counted by its collector.

At shutdown ``drain`` takes what the sockets hold until they are quiet or the deadline
passes, then disconnects every peer and counts what libzmq still held as
``rejected{reason="shutdown"}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

from esper_telemetry.codec import WireError, decode

from .fastdecode import decode_norms
from .queue import EventQueue
from .stats import DaemonStats

__all__ = ["Receiver", "receive_hwm"]

_log = logging.getLogger(__name__)

# Per wakeup, at most this many messages, events or bytes are handled before yielding to
# the loop. Bounded in events and bytes too: the aggregator must get its turn before the
# receiver can fill the queue (and memory) with one burst of large batches.
_BURST_MESSAGES = 512
_BURST_EVENTS = 4096
_BURST_BYTES = 4 << 20
# At shutdown, the sockets count as drained once nothing arrived for this long.
_QUIET_S = 0.1


def receive_hwm(receive_buffer_bytes: int, max_message_bytes: int) -> int:
    """The receive high-water mark, in messages, that holds at most ``receive_buffer_bytes``
    of messages of at most ``max_message_bytes`` per peer (at least 1)."""
    return max(1, receive_buffer_bytes // max_message_bytes)


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
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.endpoints.append(endpoint)
        return list(self.endpoints)

    async def run(self) -> None:
        """Pump every socket until cancelled."""
        await asyncio.gather(*(self._pump(s) for s in self._sockets))

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
            for shadow in shadows:
                got += self._take(shadow)
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

    def _take(self, shadow: zmq.Socket, msg: bytes | None = None) -> int:
        """Decode and queue ``msg`` (when given) and what ``shadow`` already buffers, up to
        a burst; how many messages. The one decode-and-queue loop, for ``_pump`` and
        ``drain``: nothing that arrives can raise out of it."""
        recv = shadow.recv
        noblock = zmq.NOBLOCK
        again = zmq.Again
        put = self._queue.put
        fast = decode_norms
        rejected = self._stats.rejected
        log = self._log
        debug = log.isEnabledFor(logging.DEBUG)
        if msg is None:
            try:
                msg = recv(noblock)
            except again:
                return 0
        n = 0
        budget = _BURST_EVENTS
        size = 0
        while True:
            n += 1
            size += len(msg)
            # The common message through the fast decoder; anything it does not vouch
            # for through the codec, which decides (and says why it rejects).
            events = fast(msg)
            if events is None:
                try:
                    events = decode(msg)
                except WireError as exc:
                    rejected[exc.reason] += 1
                    if debug:
                        log.debug("rejected a message of %d bytes: %s", len(msg), exc)
                    events = None
                except Exception:  # a codec bug; the codec promises only WireError
                    rejected["internal"] += 1
                    log.exception("internal error decoding a message; it was dropped")
                    events = None
            if events is not None:
                budget -= len(events)
                if not put(events):
                    rejected["queue_full"] += 1
            if n >= _BURST_MESSAGES or budget <= 0 or size >= _BURST_BYTES:
                break
            try:
                msg = recv(noblock)
            except again:
                break
        self._stats.messages += n
        return n

    def close(self) -> None:
        """Close every socket at once, dropping what libzmq still buffers (linger 0)."""
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()

    async def _pump(self, sock: zmq.asyncio.Socket) -> None:
        shadow = zmq.Socket.shadow(sock.underlying)
        take = self._take
        while True:
            take(shadow, await sock.recv())
            # An awaited recv that finds a message ready does not yield: do it here.
            await asyncio.sleep(0)
