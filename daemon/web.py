"""The HTTP endpoint: the telemetry path, ``/-/healthy``, ``/-/ready``, and a landing page.

A small asyncio HTTP/1.1 server (one request per connection, ``Connection: close``) so it
shares the event loop's lifecycle and needs no extra dependency. A scrape takes the
snapshot on the loop, in the request's handler (one consistent instant, no locks), then
renders it on a worker thread, so a large scrape does not stall ingest for its rendering
time; the worker never waits on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import logging
from typing import Any, Callable, Optional, Tuple

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .textformat import CONTENT_TYPE, render_text

__all__ = ["WebServer"]

_log = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 16384
_READ_TIMEOUT_S = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


class WebServer:
    """Serves the exposition at ``path``; ``ready()`` decides ``/-/ready``.

    Per scrape: ``snapshot()`` on the loop thread, then ``registry(snapshot)`` and its
    rendering on a worker thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        snapshot: Callable[[], Any],
        registry: Callable[[Any], Collector],
        ready: Callable[[], bool],
        logger: logging.Logger = _log,
    ) -> None:
        self._host = host
        self._port = port
        self._path = path
        self._snapshot = snapshot
        self._registry = registry
        self._ready = ready
        self._log = logger
        self._server: Optional[asyncio.base_events.Server] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="scrape")
        self.scraped = asyncio.Event()  # set after each successful scrape

    async def start(self) -> Tuple[str, int]:
        """Bind and listen; returns the bound (host, port). Raises ``OSError`` on failure."""
        self._server = await asyncio.start_server(
            self._handle, self._host or None, self._port, reuse_address=True,
            limit=_MAX_HEADER_BYTES)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening, let requests in flight finish briefly, release the threads."""
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body, extra = await self._respond(reader)
        except Exception:  # a bug; answer 500 rather than drop the connection silently
            self._log.exception("error answering an HTTP request")
            status, ctype, body, extra = 500, "text/plain", b"internal error\n", {}
        head_only = extra.pop("_head", False)
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
                f"Content-Type: {ctype}", f"Content-Length: {len(body) if body else 0}",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in extra.items()]
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if body and not head_only:
                writer.write(body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> Tuple[int, str, bytes, dict]:
        text = "text/plain; charset=utf-8"
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        except asyncio.TimeoutError:
            return 408, text, b"request timeout\n", {}
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return 400, text, b"bad request\n", {}
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, text, b"bad request\n", {}
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n", {"Allow": "GET, HEAD"}
        extra = {"_head": True} if method == "HEAD" else {}
        if path == self._path:
            snapshot = self._snapshot()
            body, ctype, enc = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._render, snapshot, headers.get("accept"),
                headers.get("accept-encoding", ""))
            if enc:
                extra["Content-Encoding"] = enc
            self.scraped.set()
            return 200, ctype, body, extra
        if path == "/-/healthy":
            return 200, text, b"Healthy.\n", extra
        if path == "/-/ready":
            if self._ready():
                return 200, text, b"Ready.\n", extra
            return 503, text, b"Not ready.\n", extra
        if path == "/":
            page = (f"<html><head><title>esper-telemetryd</title></head><body>"
                    f"<h1>esper-telemetryd</h1><p><a href=\"{self._path}\">Metrics</a></p>"
                    f"</body></html>\n").encode()
            return 200, "text/html; charset=utf-8", page, extra
        return 404, text, b"not found\n", extra

    def _render(self, snapshot: Any, accept: Optional[str], accept_encoding: str
                ) -> Tuple[bytes, str, str]:
        """On a worker thread: the exposition of ``snapshot``, encoded as negotiated."""
        registry = self._registry(snapshot)
        encoder, ctype = choose_encoder(accept)
        if ctype.startswith("text/plain"):
            body, ctype = render_text(registry), CONTENT_TYPE
        else:  # OpenMetrics, negotiated: prometheus_client's own encoder
            body = encoder(registry)
        if "gzip" in accept_encoding:
            return gzip.compress(body, compresslevel=1), ctype, "gzip"
        return body, ctype, ""
