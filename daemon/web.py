"""The HTTP endpoint: the telemetry path, ``/-/healthy``, ``/-/ready``, and a landing page.

Served by aiohttp's low-level server (a maintained HTTP/1.1 parser: keep-alive, pipelining,
bare-LF requests answered, not waited on). A scrape takes the snapshot on the loop, in the
request's handler (one consistent instant, no locks), then renders it on a worker thread, so
a large scrape does not stall ingest; the worker never waits on the loop.

Memory is bounded per connection and in connections: the body is written in 64 KiB
chunks, each waiting for the peer to read (so a non-reading client holds a reference to one
body and at most about 64 KiB of buffered copy), the whole write within
``write_timeout_s`` or the connection is aborted; at most ``max_connections`` are open,
further ones are answered 503 and closed at once. The bodies themselves are bounded in
bytes: those being rendered or written hold at most ``max_body_bytes`` together (one is
always let through), and at most ``MAX_RENDERING`` scrapes render or wait for a render
thread at once; a scrape past either is answered 503 with ``Retry-After`` and counted in
``busy``, so clients that ask and never read cannot multiply the exposition's size in
memory (the series cap, --web.max-series, bounds one body). ``ssl_context`` (TLS, issue
11) is handed to the listening socket as is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import gzip
import html
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_server import Server

from esper_telemetry.version import __version__

from .textformat import negotiate

__all__ = ["WebServer", "accepts_gzip", "MAX_BODY_BYTES", "MAX_RENDERING"]

_log = logging.getLogger(__name__)

_CHUNK = 1 << 16
# Bodies being rendered or written hold at most this many bytes together (one is always
# let through), and at most this many scrapes render or wait for a render thread at once;
# past either a scrape is answered 503 (``busy``).
MAX_BODY_BYTES = 128 << 20
MAX_RENDERING = 4
_TEXT = "text/plain; charset=utf-8"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 33\r\nConnection: close\r\n\r\ntoo many connections, try again\r\n"
)


def accepts_gzip(header: str) -> bool:
    """Whether an ``Accept-Encoding`` value admits gzip (RFC 9110 q-values; ``*`` counts)."""
    star: float | None = None
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if name in ("gzip", "x-gzip"):
            return q > 0
        if name == "*":
            star = q
    return star is not None and star > 0


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or nothing elsewhere.

    Abandoned multi-MB bodies are freed into glibc's heaps (its mmap threshold rises past
    their size after the first free), which keeps them in RSS; trimming returns them.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: (trim(0), None)[1]


_TRIM = _malloc_trim()


class _Refuse(asyncio.Protocol):
    """A connection over the cap: one 503 and close, nothing read or buffered."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_BUSY)  # type: ignore[attr-defined]
        transport.close()


class WebServer:
    """Serves the exposition at ``path``; ``ready()`` decides ``/-/ready``.

    Per scrape: ``snapshot()`` on the loop thread, then ``render(snapshot, fmt)`` on a
    worker thread, in the format the ``Accept`` header prefers by q-value
    (``textformat.negotiate``, once per scrape: OpenMetrics or text), gzipped when
    ``Accept-Encoding`` admits it. ``refused``, ``write_timeouts`` and ``busy`` count
    connections turned away by the cap, responses abandoned by the write timeout, and
    scrapes turned away because bodies in flight would pass ``max_body_bytes``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        snapshot: Callable[[], Any],
        render: Callable[[Any, str], bytes],
        ready: Callable[[], bool],
        logger: logging.Logger = _log,
        *,
        write_timeout_s: float,
        max_connections: int,
        keepalive_timeout_s: float = 75.0,
        ssl_context: ssl.SSLContext | None = None,
        auth: Any = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        pages: Any = None,
    ) -> None:
        self._host = host
        self._port = port
        self._path = path
        self._snapshot = snapshot
        self._render_body = render
        self._ready = ready
        self._log = logger
        self._write_timeout_s = write_timeout_s
        self._max_connections = max_connections
        self._keepalive_timeout_s = keepalive_timeout_s
        self._ssl = ssl_context
        # Basic auth (webconfig.BasicAuth, --web.config.file) for every path but the health
        # checks; None: open. ``unauthorized`` counts requests answered 401.
        self._auth = auth
        # The live page and its JSON API (daemon/page.py's Pages), behind the same auth.
        self._pages = pages
        self.unauthorized = 0
        self._server: asyncio.base_events.Server | None = None
        self._http: Server | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="scrape")
        self.scraped = asyncio.Event()  # set after each successful scrape
        self.refused = 0
        self.write_timeouts = 0
        # Scrapes answered 503 because bodies in flight would pass max_body_bytes, or
        # MAX_RENDERING renders were already under way.
        self.busy = 0
        self._max_body_bytes = max_body_bytes
        self._held = 0  # bytes of bodies being rendered (guessed) or written
        self._rendering = 0
        self._sizes: dict[tuple[str, bool], int] = {}  # last body size by (format, gzip)
        self._trim: asyncio.TimerHandle | None = None

    @property
    def connections(self) -> int:
        """HTTP connections open now."""
        return len(self._http.connections) if self._http is not None else 0

    async def start(self) -> tuple[str, int]:
        """Bind and listen; returns the bound (host, port). Raises ``OSError`` on failure."""
        self._http = Server(
            self._handle,
            access_log=None,
            max_line_size=8190,
            max_field_size=8190,
            keepalive_timeout=self._keepalive_timeout_s,
            handler_cancellation=True,
        )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self._host or None,
            self._port,
            reuse_address=True,
            ssl=self._ssl,
            backlog=128,
        )
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def _protocol(self) -> asyncio.BaseProtocol:
        assert self._http is not None
        if len(self._http.connections) >= self._max_connections:
            self.refused += 1
            return _Refuse()
        return self._http()

    async def close(self) -> None:
        """Stop listening, let requests in flight finish briefly, release the threads."""
        if self._server is not None:
            self._server.close()
        if self._http is not None:
            try:
                await asyncio.wait_for(self._http.shutdown(1.0), 2.0)
            except asyncio.TimeoutError:
                pass
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._respond(request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # a bug; answer 500 rather than drop the connection silently
            self._log.exception("error answering an HTTP request")
            return web.Response(status=500, text="internal error\n")

    async def _respond(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(
                status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"}
            )
        path = request.path
        if self._auth is not None and path not in ("/-/healthy", "/-/ready"):
            if not await self._authorized(request.headers.get("Authorization")):
                self.unauthorized += 1
                return web.Response(
                    status=401,
                    text="unauthorized\n",
                    headers={"WWW-Authenticate": 'Basic realm="esper-telemetryd"'},
                )
        if path == self._path:
            return await self._scrape(request)
        if path == "/-/healthy":
            return web.Response(text="Healthy.\n")
        if path == "/-/ready":
            if self._ready():
                return web.Response(text="Ready.\n")
            return web.Response(status=503, text="Not ready.\n")
        if self._pages is not None:
            answered = await self._pages.respond(request, self._write_timeout_s)
            if answered is not None:
                return answered
        if path == "/":
            p = html.escape(self._path, quote=True)
            page = (
                f"<html><head><title>esper-telemetryd</title></head><body>"
                f"<h1>esper-telemetryd</h1><p>Version {html.escape(__version__)}</p><ul>"
                f'<li><a href="{p}">Metrics</a></li>'
                f'<li><a href="/-/healthy">Health</a></li>'
                f'<li><a href="/-/ready">Readiness</a></li></ul></body></html>\n'
            )
            return web.Response(text=page, content_type="text/html")
        return web.Response(status=404, text="not found\n")

    async def _authorized(self, header: str | None) -> bool:
        """Credentials seen before answer at once; new ones take a bcrypt, off the loop."""
        known = self._auth.known(header)
        if known is not None:
            return known
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._auth.check, header
        )

    async def _scrape(self, request: web.BaseRequest) -> web.StreamResponse:
        gz = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        fmt, ctype = negotiate(request.headers.get("Accept"))
        kind = (fmt, gz)
        # What this response will hold, guessed from the last body of its kind (or the
        # largest seen), reserved before rendering: bodies being rendered or written stay
        # within max_body_bytes (one is always let through), and a crowd of clients that
        # do not read cannot multiply the exposition's size in memory.
        guess = self._sizes.get(kind) or max(self._sizes.values(), default=0)
        if self._rendering >= MAX_RENDERING or (
            self._held and self._held + guess > self._max_body_bytes
        ):
            self.busy += 1
            resp = web.Response(
                status=503,
                text="busy: too many scrapes in flight, try again\n",
                headers={"Retry-After": "1"},
            )
            resp.force_close()  # a client that asks and never reads keeps nothing open
            return resp
        self._held += guess
        held = guess
        self._rendering += 1
        try:
            snapshot = self._snapshot()
            body = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._render, snapshot, fmt, gz
            )
        except BaseException:
            self._held -= held
            raise
        finally:
            self._rendering -= 1
        self._sizes[kind] = len(body)
        self._held += len(body) - held
        held = len(body)
        try:
            return await self._answer(request, body, ctype, gz)
        finally:
            self._held -= held

    async def _answer(
        self, request: web.BaseRequest, body: bytes, ctype: str, gz: bool
    ) -> web.StreamResponse:
        # The body depends on both headers: caches must key on both.
        resp = web.StreamResponse(
            headers={"Content-Type": ctype, "Vary": "Accept, Accept-Encoding"}
        )
        if gz:
            resp.headers["Content-Encoding"] = "gzip"
        resp.content_length = len(body)
        try:
            await asyncio.wait_for(self._send(request, resp, body), self._write_timeout_s)
        except asyncio.TimeoutError:
            self.write_timeouts += 1
            if request.transport is not None:
                request.transport.abort()  # frees what the transport still buffers
            if self._trim is None:  # once the abandoned bodies are gone, hand memory back
                self._trim = asyncio.get_running_loop().call_later(0.5, self._trimmed)
            raise ConnectionResetError("write timeout") from None
        self.scraped.set()
        return resp

    def _trimmed(self) -> None:
        self._trim = None
        _TRIM()

    @staticmethod
    async def _send(request: web.BaseRequest, resp: web.StreamResponse, body: bytes) -> None:
        await resp.prepare(request)
        if request.method != "HEAD":
            view = memoryview(body)
            for i in range(0, len(view), _CHUNK):
                await resp.write(view[i : i + _CHUNK])
        await resp.write_eof()

    def _render(self, snapshot: Any, fmt: str, gz: bool) -> bytes:
        """On a worker thread: the exposition of ``snapshot`` in ``fmt``, gzipped if ``gz``."""
        body = self._render_body(snapshot, fmt)
        return gzip.compress(body, compresslevel=1) if gz else body
