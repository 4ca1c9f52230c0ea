"""End to end: the console script as a real process. Events in, scrape, signal, exit code."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq
from daemon_process import ROOT, scrape_until, spawn, started
from daemon_support import get, heartbeat, hello, host_seed, http_get

from esper_telemetry import encode

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_console_script_events_in_scrape_signal_exit_zero(sig):
    proc = spawn("--zmq.listen-address=tcp://127.0.0.1:*", "--web.listen-address=127.0.0.1:0")
    try:
        (endpoint,), web = started(proc)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(endpoint)
        sock.send(encode(hello(run="e2e", world_size=1)))
        sock.send(
            encode([host_seed(run="e2e", step=s, host_sq=9.0, seed_sq=1.0) for s in range(1, 11)])
        )
        sock.send(encode(heartbeat(run="e2e", dropped=3)))
        sock.send(b"not msgpack \xc1")
        s = scrape_until(
            f"http://{web}/metrics",
            lambda s: (
                get(s, "esper_daemon_events_total") == 12
                and get(s, "esper_daemon_rejected_total", reason="malformed") == 1
            ),
        )
        sock.close()
        ctx.term()
        assert get(s, "esper_daemon_events_total") == 12
        assert get(s, "esper_grad_norm", run="e2e", group="host") == 3.0
        assert get(s, "esper_seed_grad_ratio", run="e2e", seed="seed") == pytest.approx(2 / 3)
        assert get(s, "esper_last_step", run="e2e") == 10
        assert get(s, "esper_collector_dropped_events_total", run="e2e") == 3
        assert get(s, "esper_daemon_rejected_total", reason="malformed") == 1
        assert http_get(f"http://{web}/-/ready")[0] == 200
        proc.send_signal(sig)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    err = proc.stderr.read()
    lines = err.splitlines()
    assert lines and all(re.match(r"ts=\S+ level=\w+ logger=\S+ msg=\"", ln) for ln in lines), err
    assert f"{signal.Signals(sig).name} received" in err and "stopped: messages=4 events=12" in err


def test_python_dash_m_daemon_runs_the_same_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "esper_telemetry.daemon", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("esper-telemetryd ")


def test_port_in_use_exits_non_zero_with_one_clear_line():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        proc = spawn(
            "--zmq.listen-address=tcp://127.0.0.1:*", f"--web.listen-address=127.0.0.1:{port}"
        )
        _, err = proc.communicate(timeout=30)
    finally:
        busy.close()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "level=error" in lines[0], err
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


def test_unbindable_zmq_address_exits_non_zero_with_one_clear_line():
    proc = spawn("--zmq.listen-address=tcp://203.0.113.7:5569", "--web.listen-address=127.0.0.1:0")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot bind tcp://203.0.113.7:5569" in lines[0], err


def test_invalid_flag_exits_two_and_check_config_exits_zero():
    proc = spawn("--queue.size=0")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.count("\n") == 1 and "--queue.size" in err
    proc = spawn("--check-config", "--zmq.listen-address=ipc:///tmp/esper-check.sock")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_second_signal_exits_at_once():
    # A long linger keeps the first SIGTERM's shutdown waiting for a last scrape.
    proc = spawn(
        "--zmq.listen-address=tcp://127.0.0.1:*",
        "--web.listen-address=127.0.0.1:0",
        "--shutdown.linger-seconds=60",
    )
    try:
        _, web = started(proc)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while http_get(f"http://{web}/-/ready")[0] != 503:  # draining, still answering
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "second SIGTERM: exiting now" in proc.stderr.read()
