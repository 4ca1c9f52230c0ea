"""A real ``esper-telemetryd`` process for tests of the trainer integrations and ``top``.

Started the one way the project starts a daemon (``esper_telemetry.commands.daemon_process``):
its console script on random loopback ports, its log in a file, stopped with SIGTERM and a
bounded wait. Scrapes are parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import procfs
import zmq
from daemon_support import http_get, parse

from esper_telemetry.commands.daemon_process import DaemonProcess, DaemonStartError

ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

READY_TIMEOUT_S = 20.0


class LiveDaemon(DaemonProcess):
    """``esper-telemetryd`` on random loopback ports; ``endpoint`` for collectors, ``url`` for
    /metrics; its log in ``log_path``."""

    def __init__(
        self,
        log_path: Path,
        *args: str,
        web_port: int = 0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        try:
            super().__init__(
                f"--web.listen-address=127.0.0.1:{web_port}",
                *args,
                log_path=log_path,
                cwd=ROOT,
                preexec_fn=preexec_fn,
            )
        except DaemonStartError as exc:
            raise AssertionError(str(exc)) from None

    def rss_bytes(self) -> int:
        """The daemon process's resident memory now, from /proc."""
        return procfs.rss_bytes(self.proc.pid)

    def open_fds(self) -> int:
        """The daemon process's open file descriptors now, from /proc."""
        return procfs.open_fds(self.proc.pid)

    def scrape(self) -> Samples:
        status, body, _ = http_get(self.url)
        assert status == 200, f"/metrics answered {status}; daemon log:\n{self.log()}"
        return parse(body)

    def scrape_until(
        self,
        ok: Callable[[Samples], bool],
        what: str,
        timeout_s: float = 10.0,
        interval_s: float = 0.02,
    ) -> Samples:
        """Scrape until ``ok(samples)``; fails after ``timeout_s`` saying ``what`` was awaited.

        ``interval_s`` between scrapes: a test that fills the daemon with thousands of groups
        waits longer, or its own scrapes take the event loop from the ingest it waits for."""
        deadline = time.monotonic() + timeout_s
        while True:
            samples = self.scrape()
            if ok(samples):
                return samples
            if time.monotonic() > deadline:
                ours = {
                    k: v
                    for k, v in samples.items()
                    if k[0].startswith("esper_") and "daemon" not in k[0]
                }
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what}; last scrape: "
                    f"{str(ours)[:2000]}"
                )
            time.sleep(interval_s)


class PeakRss:
    """The largest RSS of ``daemon`` (from /proc, every ``interval_s``) while in the block:
    ``base`` at entry, ``peak`` at exit (and so far, inside)."""

    def __init__(self, daemon: LiveDaemon, interval_s: float = 0.01) -> None:
        self._daemon = daemon
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.base = self.peak = 0

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self._daemon.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._daemon.rss_bytes())
            time.sleep(self._interval_s)


def push_socket(ctx: zmq.Context, endpoint: str, linger_ms: int = 10_000) -> zmq.Socket:
    """A collector's PUSH socket to ``endpoint`` that never drops a send (no high-water
    mark) and, closed, waits ``linger_ms`` for the daemon to take what it holds."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    return sock


@contextlib.contextmanager
def live_daemon(log_path: Path, *args: str) -> Iterator[LiveDaemon]:
    """A ``LiveDaemon`` for a test: stopped after it, and its exit status must be 0."""
    d = LiveDaemon(log_path, *args)
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, f"esper-telemetryd exited with {code}:\n{d.log()}"
