"""ZeroMQ ingest: one PULL socket per listen address, decoding into the bounded queue.

Each socket is a ``zmq.asyncio`` socket; after an awaited receive, the pump drains what is
already buffered with non-blocking receives on a synchronous shadow of the same socket
(no future per message), up to a burst, then yields so the aggregator can run. Every frame
is one message: decoded whole by ``esper_telemetry.decode`` or rejected whole and counted
by the ``WireError`` reason. Nothing that arrives can raise out of the pump.

``ZMQ_MAXMSGSIZE`` makes libzmq refuse oversize frames before Python allocates them (it
drops the sending peer's connection; such frames are not counted here). The receive
high-water mark bounds what libzmq buffers; beyond it, senders' non-blocking sends fail
and their collectors count the drop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import List, Sequence

import zmq
import zmq.asyncio

from esper_telemetry.codec import WireError, decode
from esper_telemetry.defaults import MAX_MESSAGE_BYTES

from .queue import EventQueue
from .stats import DaemonStats

__all__ = ["Receiver", "RECEIVE_HWM"]

_log = logging.getLogger(__name__)

# Messages libzmq may buffer per connected collector before pushing back on it (a PULL
# socket's high-water mark is per peer). A collector's message carries up to 256 events,
# so this is ample slack while bounding what a stalled daemon holds per collector.
RECEIVE_HWM = 10_000
# Per wakeup, at most this many messages or events are handled before yielding to the
# loop. Bounded in events too: the aggregator must get its turn before the receiver can
# fill the queue with one burst of large batches.
_BURST_MESSAGES = 512
_BURST_EVENTS = 4096


class Receiver:
    """Binds PULL sockets on ``addresses`` and pumps decoded messages into ``queue``."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        addresses: Sequence[str],
        queue: EventQueue,
        stats: DaemonStats,
        logger: logging.Logger = _log,
    ) -> None:
        self._context = context
        self._addresses = tuple(addresses)
        self._queue = queue
        self._stats = stats
        self._log = logger
        self._sockets: List[zmq.asyncio.Socket] = []
        self.endpoints: List[str] = []  # as bound (a wildcard port resolved)

    def bind(self) -> List[str]:
        """Bind every address; raises ``zmq.ZMQError`` naming the endpoint on failure."""
        for address in self._addresses:
            sock = self._context.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            sock.setsockopt(zmq.IPV6, 1)  # else libzmq refuses tcp://[ADDR]:PORT endpoints
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

    def close(self) -> None:
        """Close every socket at once, dropping what libzmq still buffers (linger 0)."""
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()

    async def _pump(self, sock: zmq.asyncio.Socket) -> None:
        shadow = zmq.Socket.shadow(sock.underlying)
        recv = shadow.recv
        noblock = zmq.NOBLOCK
        again = zmq.Again
        put = self._queue.put
        stats = self._stats
        rejected = stats.rejected
        log = self._log
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            msg = await sock.recv()
            n = 0
            budget = _BURST_EVENTS
            while True:
                n += 1
                try:
                    events = decode(msg)
                except WireError as exc:
                    rejected[exc.reason] += 1
                    if debug:
                        log.debug("rejected a message of %d bytes: %s", len(msg), exc)
                except Exception:  # a codec bug; the codec promises only WireError
                    rejected["internal"] += 1
                    log.exception("internal error decoding a message; it was dropped")
                else:
                    budget -= len(events)
                    if not put(events):
                        rejected["queue_full"] += 1
                if n >= _BURST_MESSAGES or budget <= 0:
                    break
                try:
                    msg = recv(noblock)
                except again:
                    break
            stats.messages += n
            # An awaited recv that finds a message ready does not yield: do it here.
            await asyncio.sleep(0)
