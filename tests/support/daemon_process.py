"""The daemon's console script with its output on pipes, for the tests of the command line
itself (exit status, what it prints on a bad flag): start it, read where it listens from its
first log line, scrape it until a condition holds (every wait bounded). Tests of a running
daemon use ``live_daemon.LiveDaemon``."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from daemon_support import http_get, parse

from esper_telemetry.commands.daemon_process import console_script

ROOT = Path(__file__).resolve().parents[2]


def command() -> list[str]:
    return console_script("esper-telemetryd", "esper_telemetry.daemon")


def spawn(*args: str, cmd: list[str] = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
    return subprocess.Popen(
        [*(cmd or command()), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def started(proc: subprocess.Popen):
    line = proc.stderr.readline()  # the first record is the listening line, or the error
    m = re.search(r"zmq=(\S+) web=(\S+)", line)
    assert m, f"no listening line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
    return m.group(1).split(","), m.group(2)


def scrape_until(url: str, ok, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        status, body, _ = http_get(url)
        s = parse(body) if status == 200 else {}
        if ok(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)
