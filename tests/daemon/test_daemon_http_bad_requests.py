"""A client that does not speak HTTP is the client's fault: a 400, counted, and no error
with a traceback in the daemon's log (issue 20, item 9). A real daemon process, raw TCP."""

from __future__ import annotations

import socket
import time

from daemon_support import get
from live_daemon import live_daemon

BAD = (
    b"GARBAGE\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
)


def _send(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(payload)
        return s.recv(200)


def test_malformed_requests_are_answered_400_counted_and_not_logged_as_errors(tmp_path):
    with live_daemon(tmp_path / "d.log") as d:
        host, port = d.url.split("//")[1].split("/")[0].rsplit(":", 1)
        for payload in BAD:
            assert _send((host, int(port)), payload).startswith(b"HTTP/1.0 400 "), payload
        s = d.scrape_until(
            lambda s: get(s, "esper_daemon_http_refused_total", reason="bad_request") == len(BAD),
            f"{len(BAD)} bad requests counted",
        )
        # The live page's refusals beside them, created at 0 (test_daemon_page.py counts).
        for reason in ("page_busy", "page_write_timeout"):
            assert get(s, "esper_daemon_http_refused_total", reason=reason) == 0
        time.sleep(0.2)
        log = d.log()
    assert "Traceback" not in log and "level=error" not in log, log
