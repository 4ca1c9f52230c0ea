"""``esper-telemetryd`` as a child process: the one way the demo, the tests and the benchmarks
start a daemon.

The daemon listens on ports the kernel picks (``tcp://127.0.0.1:*`` and ``127.0.0.1:0``) and
says where in its first log line (``... zmq=ENDPOINTS web=HOST:PORT``), so two starts never
race for a port. Its log goes to a file, not a pipe: nobody reads a pipe while a job trains,
and a full pipe would stall the daemon. ``ESPER_*`` variables of the caller's shell are
dropped, so the flags given here are the ones in force. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

__all__ = ["DaemonProcess", "DaemonStartError", "console_script", "http_get"]

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
_LISTENING = re.compile(rb"zmq=(\S+) web=(\S+)")


class DaemonStartError(RuntimeError):
    """The daemon exited or said nothing of where it listens in time; the message has its log."""


def console_script(name: str, module: str) -> list[str]:
    """The console script ``name`` beside this interpreter, else on PATH, else ``python -m``."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


class DaemonProcess:
    """A running ``esper-telemetryd``: ``endpoint`` for collectors, ``web`` and ``url`` for HTTP.

    ``args`` are more flags (they may override the listen addresses). ``log_path`` keeps the
    log where the caller can read it afterwards (else a temporary file); ``command`` replaces
    the console script (a benchmark's other source tree), ``env`` adds variables.
    """

    def __init__(
        self,
        *args: str,
        log_path: Path | None = None,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | str | None = None,
        preexec_fn: Callable[[], None] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.log_path = log_path
        if log_path:
            open(log_path, "wb").close()  # a fresh log
        # Append mode (O_APPEND): the daemon writes through the same open file, whose offset
        # reading the log moves; appends always land at the end, so a read never makes the
        # daemon overwrite what it wrote before.
        self._log: IO[bytes] = open(log_path, "a+b") if log_path else tempfile.TemporaryFile("a+b")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
        environ.update(env or {})
        try:
            self.proc = subprocess.Popen(
                [
                    *(command or console_script("esper-telemetryd", "esper_telemetry.daemon")),
                    "--zmq.listen-address=tcp://127.0.0.1:*",
                    "--web.listen-address=127.0.0.1:0",
                    "--shutdown.timeout-seconds=2",
                    *args,
                ],
                cwd=cwd,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec_fn,
            )
        except OSError as exc:
            self._log.close()
            raise DaemonStartError(f"could not start esper-telemetryd: {exc}") from None
        try:
            self.endpoints, web = self._listening(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.endpoint = self.endpoints[0]
        self.web = f"http://{web}"
        self.url = f"{self.web}/metrics"

    def _listening(self, timeout_s: float) -> tuple[list[str], str]:
        deadline = time.monotonic() + timeout_s
        while True:
            m = _LISTENING.search(self._read_log())
            if m is not None:
                return m.group(1).decode().split(","), m.group(2).decode()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                what = f"exited with status {self.proc.returncode}" if self.proc.poll() else ""
                raise DaemonStartError(
                    f"esper-telemetryd {what or 'did not say where it listens'}:\n{self.log()}"
                )
            time.sleep(0.02)

    def _read_log(self) -> bytes:
        if self._log.closed:
            return self.log_path.read_bytes() if self.log_path else b""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def log(self, tail_chars: int = 4000) -> str:
        """The end of the daemon's log so far."""
        try:
            return self._read_log().decode("utf-8", "replace")[-tail_chars:]
        except (OSError, ValueError):
            return "(no log)"

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until ``/-/ready`` answers 200; DaemonStartError when it exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while http_get(f"{self.web}/-/ready", 0.5)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DaemonStartError(f"esper-telemetryd never became ready:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig``, wait up to ``timeout_s``, then SIGKILL; the exit status. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
