"""Publishing never blocks or crashes training: no daemon, a stuck sender, a full queue,
interpreter exit without close(), and fork()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import torch
from collector_support import (
    REPO,
    free_port,
    make_model,
    ref_sq,
    rel_err,
    run_script,
    subprocess_env,
    train_step,
)
from torch import nn

import esper_telemetry as et
from esper_telemetry import Goodbye, Heartbeat, Hello, Norms


def test_no_daemon_training_goes_on_and_close_is_bounded():
    model = make_model()
    close_timeout_s = 1.0
    tel = et.attach(
        model=model,
        host="host",
        seeds={"a": "seeds.a"},
        run="nodaemon",
        endpoint=f"tcp://127.0.0.1:{free_port()}",
        close_timeout_s=close_timeout_s,
    )
    try:
        train_step(model)
        t0 = time.monotonic()
        for step in range(200):
            tel.capture(step=step)
            if step % 50 == 49:
                assert tel.flush(5.0)  # nothing to wait for: the pipe takes it all
        capture_s = time.monotonic() - t0
        assert capture_s < 3.0, capture_s
        stats = tel.stats()
        assert stats["captures"] == 200 and stats["completed"] == 200
        assert stats["pending"] == 0 and stats["errors"] == 0
        assert stats["sent"] + stats["dropped"] == 201  # Hello + 200 Norms, each accounted for
        res = tel.latest()
        assert (
            res.step == 199
            and rel_err(res.groups["host"].sq, ref_sq(model.host.parameters())) <= 1e-5
        )
    finally:
        t0 = time.monotonic()
        tel.close()
        elapsed = time.monotonic() - t0
    assert elapsed < close_timeout_s + 1, elapsed
    t0 = time.monotonic()
    tel.close()  # idempotent and immediate
    tel.capture()  # a no-op after close, never an error
    assert time.monotonic() - t0 < 0.1
    assert tel.stats()["captures"] == 200 and tel.stats()["errors"] == 0
    deadline = time.monotonic() + 2.0  # close() stopped its threads (joins are bounded)
    while [t for t in threading.enumerate() if t.name.startswith("esper-telemetry")]:
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.01)


def test_stuck_sender_drops_and_counts_and_heartbeats_carry_the_count(attach, pull):
    model = make_model()
    tel = attach(model=model, host="host", queue_size=1, heartbeat_s=3600.0)
    assert tel.flush(5.0)  # Hello is out
    pub = tel._publisher
    gate, entered = threading.Event(), threading.Event()
    send = pub._send
    pub._send = lambda batch: (entered.set(), gate.wait(10.0), send(batch))[-1]
    train_step(model)
    n = 50
    t0 = time.monotonic()
    for step in range(n):
        tel.capture(step=step)
    assert time.monotonic() - t0 < 2.0  # the stuck socket never slowed capture()
    deadline = time.monotonic() + 5.0
    while tel.stats()["completed"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tel.stats()["completed"] == n
    dropped = tel.stats()["dropped"]
    assert n - 10 <= dropped < n  # a few in the sender's hands or queued, the rest dropped
    gate.set()
    assert tel.flush(5.0)
    tel.close()
    events = pull.until_goodbyes()
    norms = [e for e in events if isinstance(e, Norms)]
    assert len(norms) + dropped == n
    assert [n_.step for n_ in norms] == sorted(n_.step for n_ in norms) and norms[0].step == 0
    beats = [e for e in events if isinstance(e, Heartbeat)]
    assert beats and beats[-1].dropped == dropped
    assert beats[-1].sent == 1 + len(norms)  # Hello and the Norms sent before it
    assert tel.stats()["sent"] == 1 + len(norms) + 2  # ... then the heartbeat and Goodbye
    assert isinstance(events[-1], Goodbye) and events[-1].reason == "close"


def test_backlog_skips_are_counted_and_reported_in_heartbeats(attach, pull, monkeypatch):
    """With the completion side stalled, captures beyond the in-flight bound are skipped,
    not queued without end, and every skip is a dropped event the daemon hears about."""
    from esper_telemetry.collector import telemetry as telemetry_module

    model = make_model()
    tel = attach(model=model, host="host", heartbeat_s=3600.0)
    gate = threading.Event()
    on_done = tel._completion._on_done
    monkeypatch.setattr(tel._completion, "_on_done", lambda p: (gate.wait(10.0), on_done(p))[-1])
    train_step(model)
    bound = 64  # CPU captures get a large allowance by default; the mechanism is the same
    monkeypatch.setattr(telemetry_module, "_MAX_IN_FLIGHT_CPU", bound)
    for step in range(bound + 6):
        tel.capture(step=step)
    stats = tel.stats()
    assert stats["captures"] == bound and stats["dropped"] == 6 and stats["errors"] == 0
    gate.set()
    assert tel.flush(5.0)
    tel.capture(step=1000)  # room again: captured
    assert tel.flush(5.0) and tel.latest().step == 1000
    tel.close()
    events = pull.until_goodbyes()
    assert [e.step for e in events if isinstance(e, Norms)] == list(range(bound)) + [1000]
    assert [e for e in events if isinstance(e, Heartbeat)][-1].dropped == 6


def test_heartbeats_travel_while_idle(attach, pull):
    attach(host=nn.Linear(2, 2), heartbeat_s=0.1, run="beats")
    events = pull.until(lambda e: isinstance(e, Heartbeat), timeout_s=3.0)
    hb = [e for e in events if isinstance(e, Heartbeat)][0]
    assert (hb.run, hb.rank, hb.dropped, hb.errors) == ("beats", 0, 0, 0)
    assert hb.sent >= 1  # the Hello went before it
    assert isinstance(events[0], Hello)


_EXIT_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    import esper_telemetry as et
    m = nn.Linear(64, 64)
    tel = et.attach(host=m, endpoint=sys.argv[1], run="exit", heartbeat_s=0.05)
    for i in range(50):
        m.zero_grad()
        m(torch.randn(8, 64)).pow(2).sum().backward()
        tel.capture()
    print("EXITING", flush=True)
    # no close(): the interpreter must still exit promptly
""")


def test_exit_without_close_does_not_hang(tmp_path):
    script = tmp_path / "exit_without_close.py"
    script.write_text(_EXIT_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), f"tcp://127.0.0.1:{free_port()}"],
        cwd=str(REPO),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _readline(proc, 60.0)
        assert line.strip() == "EXITING", (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        t0 = time.monotonic()
        rc = proc.wait(timeout=10.0)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, proc.stderr.read()
    assert exit_s < 3.0, exit_s


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert box, f"no output within {timeout_s}s"
    return box[0]


_FORK_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from torch import nn
    import esper_telemetry as et
    m = nn.Linear(4, 4)
    tel = et.attach(host=m, endpoint=sys.argv[1], run="fork")

    def step(n):
        m.zero_grad()
        m(torch.randn(2, 4)).pow(2).sum().backward()
        tel.capture(step=n)

    step(0)
    assert tel.flush(5.0)
    pid = os.fork()
    if pid == 0:
        step(999)                        # the child's captures go nowhere: not the parent's socket
        t0 = time.monotonic()
        tel.close()
        close_s = time.monotonic() - t0
        print(f"CHILD captures={tel.stats()['captures']} close_s={close_s:.3f}", flush=True)
        own = et.attach(host=m, endpoint=sys.argv[1], run="forkchild")   # its own socket works
        own.capture(step=42)
        assert own.flush(5.0)
        own.close()
        sys.exit(0)                      # a normal exit: atexit handlers and finalizers run
    for n in range(1, 6):
        step(n)
    deadline = time.monotonic() + 10.0
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("PARENT child hung", flush=True)
        sys.exit(1)
    for n in range(6, 9):
        step(n)
    assert tel.flush(5.0)
    tel.close()
    rc = os.waitstatus_to_exitcode(status)
    print(f"PARENT child_rc={rc} errors={tel.stats()['errors']}", flush=True)
""")


def test_fork_child_never_uses_the_parents_socket(tmp_path, pull):
    script = tmp_path / "fork.py"
    script.write_text(_FORK_SCRIPT)
    proc = run_script(script, [pull.endpoint], timeout_s=60.0)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["PARENT"] == "child_rc=0 errors=0", proc.stdout
    child = dict(kv.split("=") for kv in lines["CHILD"].split())
    assert child["captures"] == "1"  # the child's capture was not taken
    assert float(child["close_s"]) < 0.5
    events = pull.until_goodbyes(2)
    pull.quiet(0.2)
    events = pull.events

    def by_run(run, kind):
        return [e for e in events if isinstance(e, kind) and e.run == run]

    assert [e.step for e in by_run("fork", Norms)] == list(range(9))  # no 999 from the child
    assert len(by_run("fork", Hello)) == 1 and len(by_run("fork", Goodbye)) == 1
    assert [e.step for e in by_run("forkchild", Norms)] == [42]
    assert len(by_run("forkchild", Goodbye)) == 1


def test_a_burst_of_wide_events_is_sent_in_messages_the_daemon_accepts(attach, pull):
    """After a stall the sender batches what queued up; a batch over the daemon's frame
    limit would be refused (and the connection dropped), so it must be split."""
    from esper_telemetry.daemon.config import Config
    from esper_telemetry.defaults import COLLECTOR_MESSAGE_BYTES

    groups = {f"layers.{i}.attention.seed_r{i}c{i}.adapter": nn.Linear(2, 2) for i in range(128)}
    for m in groups.values():
        m.weight.grad = torch.ones_like(m.weight)
    tel = attach(groups=groups)
    assert tel.flush(5.0)
    pub = tel._publisher
    gate = threading.Event()
    real_send = pub._send
    pub._send = lambda batch: (gate.wait(10.0), real_send(batch))[-1]
    n = 300
    for step in range(n):
        tel.capture(step=step)
    deadline = time.monotonic() + 10.0
    while tel.stats()["completed"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    assert tel.flush(10.0)
    tel.close()
    events = pull.until_goodbyes(timeout_s=10.0)  # every message decodes, or this raises
    assert [e.step for e in events if isinstance(e, Norms)] == list(range(n))
    assert tel.stats()["dropped"] == 0 and tel.stats()["errors"] == 0
    assert len(pull.sizes) >= 2 and max(pull.sizes) <= COLLECTOR_MESSAGE_BYTES
    assert COLLECTOR_MESSAGE_BYTES * 2 <= Config().zmq_max_message_bytes  # the headroom


def test_close_delivers_captures_still_in_flight(attach, pull, monkeypatch):
    """close() without flush(): captures taken before it are completed and sent before Goodbye."""
    model = make_model()
    tel = attach(model=model, host="host")
    on_done = tel._completion._on_done
    monkeypatch.setattr(tel._completion, "_on_done", lambda p: (time.sleep(0.06), on_done(p))[-1])
    train_step(model)
    for step in range(4):
        tel.capture(step=step)
    t0 = time.monotonic()
    tel.close()
    assert time.monotonic() - t0 < 2.0 + 1
    events = pull.until_goodbyes()
    assert [e.step for e in events if isinstance(e, Norms)] == [0, 1, 2, 3]
    assert isinstance(events[-1], Goodbye)
