"""A real ``esper-telemetryd`` process for tests of the trainer integrations and ``top``.

Started through its console script on random loopback ports (its first log line says
where), its log in a file (a pipe nobody reads could fill and stall it), stopped with
SIGTERM and a bounded wait. Scrapes are parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import procfs
from daemon_process import ROOT, command
from daemon_support import http_get, parse

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

READY_TIMEOUT_S = 20.0


class LiveDaemon:
    """``esper-telemetryd`` on random loopback ports; ``endpoint`` for collectors, ``url`` for /metrics."""

    def __init__(
        self,
        log_path: Path,
        *args: str,
        web_port: int = 0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *command(),
                    "--zmq.listen-address=tcp://127.0.0.1:*",
                    f"--web.listen-address=127.0.0.1:{web_port}",
                    "--shutdown.timeout-seconds=2",
                    *args,
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec_fn,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        m = None
        while m is None:
            m = re.search(r"zmq=(\S+) web=(\S+)", log_path.read_text(errors="replace"))
            if m is None:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"esper-telemetryd did not start:\n{self.log()}")
                time.sleep(0.05)
        self.endpoint = m.group(1).split(",")[0]
        self.web = f"http://{m.group(2)}"
        self.url = f"{self.web}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

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
        self, ok: Callable[[Samples], bool], what: str, timeout_s: float = 10.0
    ) -> Samples:
        """Scrape until ``ok(samples)``; fails after ``timeout_s`` saying ``what`` was awaited."""
        deadline = time.monotonic() + timeout_s
        while True:
            samples = self.scrape()
            if ok(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what}; last scrape: "
                    f"{ {k: v for k, v in samples.items() if k[0].startswith('esper_') and 'daemon' not in k[0]} }"
                )
            time.sleep(0.02)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def live_daemon(log_path: Path, *args: str) -> Iterator[LiveDaemon]:
    """A ``LiveDaemon`` for a test: stopped after it, and its exit status must be 0."""
    d = LiveDaemon(log_path, *args)
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, f"esper-telemetryd exited with {code}:\n{d.log()}"
