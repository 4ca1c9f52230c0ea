"""The one thread that owns the ZeroMQ PUSH socket.

ZeroMQ sockets are not thread safe, so every event reaches the socket through a bounded
queue fed with ``put_nowait``. Nothing here ever blocks its producers: a full queue, or a
socket that has no connected daemon with room (none yet, none any more, a slow one) drops
the event and counts it; the counts travel in the next heartbeat. ``ZMQ_IMMEDIATE`` makes
libzmq queue only to completed connections, so an event is counted as sent only once a
connected daemon's pipe took it. Messages are numbered (``seq``, schema 2) from 0, one
number per message libzmq accepted, so the daemon can count what it never received
(whatever lost it after this side let go: a reconnect, an oversize frame, its own queue).
``linger`` is bounded so a dead daemon never holds
up process exit, and a process forked from this one never touches this context.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import zmq

from esper_telemetry.codec import encode
from esper_telemetry.defaults import COLLECTOR_MESSAGE_BYTES
from esper_telemetry.events import Event, Heartbeat

from .curve import CurveKeys

__all__ = ["Publisher"]

log = logging.getLogger("esper_telemetry.collector")

_STOP = object()
# How long the sender thread waits for a connected daemon with room before it drops.
_SEND_WAIT_MS = 100


class Publisher:
    """Sends events in batches from a background thread; ``publish`` never blocks.

    ``heartbeat_s`` is the interval of heartbeats; ``run`` and ``rank`` label them.
    ``queue_size`` and ``heartbeat_s`` are settings of ``attach`` (its signature holds their
    defaults); the others are this socket's own.
    """

    def __init__(
        self,
        endpoint: str,
        run: str,
        rank: int,
        *,
        queue_size: int,
        heartbeat_s: float,
        sndhwm: int = 1000,
        linger_ms: int = 500,
        max_batch: int = 256,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._run, self._rank = run, rank
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._heartbeat_s = heartbeat_s
        self._max_batch = max_batch
        self._linger_ms = linger_ms
        self._pid = os.getpid()
        self.sent = 0
        self.messages = 0  # messages libzmq accepted: the next message's number
        self.dropped = 0
        self.errors = 0
        self.other_errors = 0  # the collector's own (capture) errors, for the heartbeats
        self._counts = threading.Lock()  # counters are bumped from several threads
        self._inflight = 0  # taken off the queue, not yet sent or dropped
        self._final: Event | None = None
        self._idle = threading.Condition()
        # Who closes the socket and context: close(), or the sender thread itself when it
        # outlives close()'s timeout (a context collected with a socket open would block).
        self._ownership = threading.Lock()
        self._thread_done = False
        self._orphaned = False
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        # Queue only to completed connections: without it, events for a daemon that is not
        # (or no longer) there wait in a pipe that nobody may ever read, counted as sent.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        if curve is not None:
            # A CURVE client: encrypted, admitted only by a daemon that knows our key. Until
            # a handshake succeeds there is no completed connection, so (IMMEDIATE) events
            # are dropped and counted, never queued, never blocking.
            self._sock.curve_serverkey = curve.server_public
            self._sock.curve_publickey = curve.client.public
            self._sock.curve_secretkey = curve.client.secret
        self._sock.connect(endpoint)
        self._thread = threading.Thread(
            target=self._loop, name="esper-telemetry-sender", daemon=True
        )
        self._thread.start()

    # -- producers (any thread) ----------------------------------------------------------
    def publish(self, event: Event) -> bool:
        """Hand one event to the sender; False (and counted as dropped) when the queue is full."""
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self.count(dropped=1)
            return False

    def count(self, dropped: int = 0, other_errors: int = 0) -> None:
        """Add to the counters heartbeats carry; safe from any thread."""
        with self._counts:
            self.dropped += dropped
            self.other_errors += other_errors

    def depth(self) -> int:
        return self._queue.qsize()

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued so far was sent or dropped; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._queue.unfinished_tasks or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def close(self, final: Event | None, timeout_s: float) -> None:
        """Send what is queued (and ``final``), then stop within ``timeout_s`` seconds."""
        if os.getpid() != self._pid:
            return  # a forked child: the parent's context is not ours to touch
        self._final = final
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        with self._ownership:
            if not self._thread_done:
                # Still sending (waiting for an absent daemon): it closes the socket and the
                # context when it ends, without lingering. The interpreter does not wait.
                self._orphaned = True
                return
        self._sock.close(linger=min(self._linger_ms, int(timeout_s * 1000)))
        self._ctx.term()

    # -- the sender thread ---------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run_loop()
        finally:
            with self._ownership:
                self._thread_done = True
                if self._orphaned:
                    self._sock.close(linger=0)
                    self._ctx.term()

    def _run_loop(self) -> None:
        next_heartbeat = time.monotonic() + self._heartbeat_s
        stopping = False
        while not stopping:
            timeout = max(0.0, next_heartbeat - time.monotonic())
            batch: list[Event] = []
            try:
                item = self._queue.get(timeout=timeout)
                items = [item]
                while len(items) < self._max_batch:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            except queue.Empty:
                items = []
            with self._idle:
                self._inflight = len(items)
            for item in items:
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)  # type: ignore[arg-type]
            if time.monotonic() >= next_heartbeat or stopping:
                batch.append(self._heartbeat())
                next_heartbeat = time.monotonic() + self._heartbeat_s
            if stopping and self._final is not None:
                batch.append(self._final)  # last, so nothing revives the run after it
            if batch:
                self._send(batch)
            with self._idle:
                for _ in items:
                    self._queue.task_done()
                self._inflight = 0
                self._idle.notify_all()

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(
            self._run,
            self._rank,
            time.time(),
            self.sent,
            self.dropped,
            self._queue.qsize(),
            self.errors + self.other_errors,
        )

    def _send(self, batch: list[Event]) -> None:
        try:
            data = encode(batch, seq=self.messages)
            if len(data) > COLLECTOR_MESSAGE_BYTES and len(batch) > 1:
                # Under half the daemon's default frame limit (libzmq refuses a larger frame
                # and drops the connection): send it as two (or more).
                half = len(batch) // 2
                self._send(batch[:half])
                self._send(batch[half:])
                return
            try:
                self._sock.send(data, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # No connected daemon with room. Wait a little on this thread (the queue
                # takes what comes meanwhile): a connection being made, or a daemon that
                # is catching up, is not yet a loss.
                if not self._sock.poll(_SEND_WAIT_MS, zmq.POLLOUT):
                    raise
                self._sock.send(data, zmq.NOBLOCK, copy=False)
            self.messages += 1  # a number is used only by what libzmq accepted: no gap
            self.sent += len(batch)
        except zmq.Again:
            self.count(dropped=len(batch))
        except Exception as exc:  # a bad event or a dying context: count, never raise
            self.errors += 1
            self.count(dropped=len(batch))
            if self.errors == 1:
                log.warning("telemetry send failed (further failures are only counted): %s", exc)
