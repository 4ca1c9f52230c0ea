"""The memory guard: what libzmq buffers for collectors, bounded by the daemon's RSS.

libzmq bounds a peer's complete messages (the receive high-water mark) and each frame
(``--zmq.max-message-bytes``), but not a multipart message still arriving: its frames pile
up in the peer's pipe, invisible to Python until the last one, and the high-water mark
counts only whole messages. One raw peer streaming a never-ending multipart message took
the daemon from 43 to 1,548 MiB in 1.6 s. No socket option bounds it, so the daemon
watches its own resident memory (``/proc/self/statm``, every ``INTERVAL_S``) and, past
``limit_bytes``, drops collector connections:

1. first the one TCP connection that received the most bytes since the previous look
   (a streamer is the busiest by far), found among the process's descriptors by its local
   port being an ingest port, its byte count from the kernel (``TCP_INFO``);
2. if the memory is still past the limit ``SETTLE_S`` later, every ingest connection.

A connection is dropped by shutting its socket down under libzmq, which then discards
what its pipe held, the half-arrived message included (libzmq's own disconnect path), and
the freed heap is returned to the system (``malloc_trim``). Collectors reconnect by
themselves; what their pipes held shows up as gaps in their message numbers. If dropping
every connection did not bring the memory back under the limit, it is not theirs (a large
state): the guard acts again only past that level plus ``REARM_BYTES``. Each drop is
counted in ``shed``, by what was dropped, and logged.

Linux only (``/proc`` and ``TCP_INFO``); elsewhere the guard does nothing. IPC peers are
not dropped (local processes). On the event loop; the look itself takes microseconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable

from .web import _TRIM

__all__ = ["MemoryGuard", "SHED_WHAT", "INTERVAL_S", "SETTLE_S", "REARM_BYTES", "rss_bytes"]

_log = logging.getLogger(__name__)

INTERVAL_S = 0.05
# After a drop, libzmq's I/O thread frees the pipe: the next look trims the heap, and the
# memory is judged again after this long.
SETTLE_S = 0.1
REARM_BYTES = 64 << 20
# What a drop dropped: the busiest connection, or every ingest connection.
SHED_WHAT = ("connection", "all")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# struct tcp_info (linux/tcp.h): tcpi_bytes_received, a u64 at byte 128 (Linux 4.1 on).
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_BYTES_RECEIVED = slice(128, 136)


def rss_bytes() -> int | None:
    """This process's resident memory now, or None where /proc does not say."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _ingest_connections(ports: frozenset[int]) -> dict[tuple[int, object], int]:
    """This process's TCP connections on ``ports`` (local side): (fd, peer) -> bytes the
    kernel has received on each."""
    out: dict[tuple[int, object], int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            fd = int(name)
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                continue
            if s.getsockname()[1] not in ports:
                continue
            peer = s.getpeername()  # a listening socket has none: OSError
            info = s.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 232)
            out[(fd, peer)] = int.from_bytes(info[_BYTES_RECEIVED], "little")
        except OSError:
            pass
        finally:
            s.close()
    return out


def _drop(fd: int, peer: object, ports: frozenset[int]) -> bool:
    """Shut down the ingest connection ``fd`` if it still is the one to ``peer``."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        if s.getsockname()[1] not in ports or s.getpeername() != peer:
            return False  # gone, and the number reused: not ours to touch
        s.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        s.close()


class MemoryGuard:
    """Drops ingest connections while the process's RSS is past ``limit_bytes`` (above)."""

    def __init__(
        self,
        limit_bytes: int,
        ports: Iterable[int],
        shed: dict[str, int],
        logger: logging.Logger = _log,
        rss: Callable[[], int | None] = rss_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit_bytes
        self._armed_at = limit_bytes  # the RSS past which the guard acts
        self._ports = frozenset(ports)
        self._shed = shed
        self._log = logger
        self._rss = rss
        self._clock = clock
        self._seen: dict[tuple[int, object], int] | None = None
        self._settle_until = float("-inf")
        self._dropped_one = False
        self._trim = False

    async def run(self) -> None:
        """Look every ``INTERVAL_S`` until cancelled."""
        if self._rss() is None or not self._ports:
            return
        while True:
            await asyncio.sleep(INTERVAL_S)
            self.look()

    def look(self) -> None:
        """One look at the memory, and what it calls for."""
        if self._trim:
            self._trim = False
            _TRIM()  # what the dropped pipes held goes back to the system
        rss = self._rss()
        if rss is None or rss <= self._armed_at:
            if rss is not None and rss <= self._limit:
                self._armed_at = self._limit
                self._dropped_one = False
            self._seen = None
            return
        if self._clock() < self._settle_until:
            return
        now_seen = _ingest_connections(self._ports)
        if self._seen is None and not self._dropped_one:
            self._seen = now_seen  # the next look says who received the most meanwhile
            return
        before = self._seen or {}
        self._seen = None
        if not now_seen:  # nothing to drop: the memory is not the connections'
            self._armed_at = max(self._limit, rss) + REARM_BYTES
            return
        busiest = max(now_seen, key=lambda k: now_seen[k] - before.get(k, 0), default=None)
        if not self._dropped_one and busiest is not None:
            if _drop(busiest[0], busiest[1], self._ports):
                self._shed["connection"] += 1
                self._dropped_one = True
                self._log.warning(
                    "resident memory %d MiB is past --limits.memory-bytes (%d MiB): dropped "
                    "the collector connection from %s, which received %d bytes in %g s",
                    rss >> 20,
                    self._limit >> 20,
                    busiest[1],
                    now_seen[busiest] - before.get(busiest, 0),
                    INTERVAL_S,
                )
        else:
            dropped = sum(_drop(fd, peer, self._ports) for fd, peer in now_seen)
            self._shed["all"] += 1
            self._dropped_one = False
            self._log.warning(
                "resident memory %d MiB is still past --limits.memory-bytes (%d MiB): dropped "
                "all %d collector connections (they reconnect by themselves)",
                rss >> 20,
                self._limit >> 20,
                dropped,
            )
            # If that does not bring it back, the memory is not the connections': act
            # again only once it grows further.
            self._armed_at = max(self._limit, rss) + REARM_BYTES
        self._trim = True
        self._settle_until = self._clock() + SETTLE_S
