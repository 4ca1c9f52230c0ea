"""Logs that cannot flood: a bounded number of one-line records per window, whatever
arrives, every logger (asyncio's too) in the daemon's format, logfmt or JSON."""

from __future__ import annotations

import io
import json
import logging
import signal

import pytest
import zmq
from daemon_process import scrape_until, spawn, started
from daemon_support import FakeClock, get, goodbye, hello

from esper_telemetry import encode
from esper_telemetry.daemon.logs import (
    PER_KIND,
    TOTAL,
    BudgetHandler,
    LogfmtFormatter,
    setup_logging,
)


def _handler(clock, **kw):
    out = io.StringIO()
    handler = BudgetHandler(out, clock=clock, **kw)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.Logger("esper_telemetry.daemon.test")
    logger.addHandler(handler)
    return logger, handler, out


def _lines(out):
    return out.getvalue().splitlines()


def test_a_repeated_record_is_written_a_few_times_then_summarized():
    clock = FakeClock()
    log, handler, out = _handler(clock)
    for i in range(10_000):
        log.info("collector hello: run=%s rank=%d", f"r{i}", 0)
    assert len(_lines(out)) == PER_KIND
    clock.advance(61)
    log.info("collector hello: run=%s rank=%d", "next", 0)
    lines = _lines(out)
    assert len(lines) == PER_KIND + 2  # the summary, then the new window's first record
    assert (
        f"{10_000 - PER_KIND} more like this" in lines[PER_KIND] and "level=warn" in lines[PER_KIND]
    )
    assert "run=next" in lines[-1]


def test_a_flood_of_many_kinds_is_bounded_in_total_and_in_memory():
    clock = FakeClock()
    log, handler, out = _handler(clock)
    for i in range(50_000):
        log.warning(f"built at run time {i}")  # every message its own template
    assert len(_lines(out)) == TOTAL
    assert len(handler._kinds) <= 1001 and len(handler._suppressed) <= 1001
    handler.flush_summaries()
    lines = _lines(out)
    assert TOTAL < len(lines) <= TOTAL + PER_KIND + 1
    assert any("records of many other kinds" in line for line in lines[TOTAL:])


def test_json_format_is_one_object_per_line_even_with_a_traceback():
    out = io.StringIO()
    logger = setup_logging("info", stream=out, fmt="json")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("failed: %s", "x")
    lines = _lines(out)
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["level"] == "error" and rec["logger"] == "esper_telemetry.daemon"
    assert rec["msg"].startswith("failed: x\nTraceback") and "boom\nsecond line" in rec["msg"]


def test_asyncio_records_go_through_the_daemon_format_and_budget():
    out = io.StringIO()
    setup_logging("info", stream=out)
    for _ in range(1000):
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logging.getLogger("asyncio").error(
                "socket.accept() out of system resource", exc_info=True
            )
    lines = _lines(out)
    assert len(lines) == PER_KIND
    assert all(
        line.startswith("ts=") and "logger=asyncio" in line and "Too many open files" in line
        for line in lines
    )


@pytest.mark.slow
def test_a_daemon_flooded_with_hellos_writes_a_bounded_log():
    """Every Hello and every run end used to be an info line: 2,000 collectors coming and going
    wrote 4,000 lines. Now the log is a handful of lines, and nothing is lost from /metrics."""
    proc = spawn(
        "--zmq.listen-address=tcp://127.0.0.1:*",
        "--web.listen-address=127.0.0.1:0",
        "--limits.max-runs=5000",
    )
    try:
        (endpoint,), web = started(proc)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(endpoint)
        n = 2000
        for i in range(n):
            sock.send(encode([hello(run=f"run-{i}"), goodbye(run=f"run-{i}")]))
        s = scrape_until(
            f"http://{web}/metrics",
            lambda s: get(s, "esper_daemon_ended_runs_total") == n,
            timeout=30,
        )
        assert get(s, "esper_daemon_ended_runs_total") == n
        sock.close()
        ctx.term()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    lines = err.splitlines()
    assert len(lines) <= TOTAL, lines[:20]
    assert (
        sum("collector hello" in line and "more like this" not in line for line in lines)
        == PER_KIND
    )
    summary = [line for line in lines if "more like this" in line and "collector hello" in line]
    assert len(summary) == 1 and f"{n - PER_KIND} more like this" in summary[0]
