"""The HTTP endpoint: the telemetry path, ``/-/healthy``, ``/-/ready``, and a landing page.

Served by aiohttp's low-level server (a maintained HTTP/1.1 parser: keep-alive, pipelining,
bare-LF requests answered, not waited on). A scrape takes the snapshot on the loop, in the
request's handler (one consistent instant, no locks), then renders it on a worker thread, so
a large scrape does not stall ingest; the worker never waits on the loop.

Memory is bounded per connection and in connections: the body is written in 64 KiB
chunks, each waiting for the peer to read (so a non-reading client holds a reference to one
body and at most about 64 KiB of buffered copy), the whole write within
``write_timeout_s`` or the connection is aborted; at most ``max_connections`` are served
at once (see below for the others). The bodies themselves are bounded in
bytes: those being rendered or written hold at most ``max_body_bytes`` together (one is
always let through), and at most ``MAX_RENDERING`` scrapes render or wait for a render
thread at once; a scrape past either is answered 503 with ``Retry-After`` and counted in
``busy``, so clients that ask and never read cannot multiply the exposition's size in
memory (the series cap, --web.max-series, bounds one body). ``ssl_context`` (TLS, issue
11) is handed to the listening socket as is.

The health checks always answer, and idle or stalled connections cannot starve a scrape:

- Every connection starts in a lobby (``_Lobby``) that only reads its first request's
  headers: within ``HEADER_TIMEOUT_S`` or it is closed (``header_timeouts``). The lobby
  holds at most ``LOBBY_PER_CONNECTION`` times ``max_connections`` connections; a new one
  past that pushes the oldest out (counted the same), so a crowd of silent or slow peers
  (200 held open, or a slowloris) never keeps a new client out.
- A request then takes one of ``max_connections`` slots (aiohttp's server). When they are
  all taken, ``/-/healthy`` and ``/-/ready`` are answered by the lobby itself (they need
  no slot, no render and no credentials: a liveness probe restarting a healthy daemon
  because slowloris peers held every slot is the failure this prevents); any other
  request takes the slot of a keep-alive connection between requests, and only when every
  slot has a request in progress is it answered 503.
- A response whose client has not read for ``STALL_S`` gives its bytes up to a scrape that
  needs them (``preempted``): clients that ask and never read cannot make the scrapes of
  one that reads answer 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import gzip
import html
import logging
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_server import Server

from esper_telemetry.version import __version__

from .textformat import negotiate

__all__ = [
    "WebServer",
    "accepts_gzip",
    "MAX_BODY_BYTES",
    "MAX_RENDERING",
    "HEADER_TIMEOUT_S",
    "LOBBY_PER_CONNECTION",
    "STALL_S",
]

_log = logging.getLogger(__name__)

_CHUNK = 1 << 16
# Bodies being rendered or written hold at most this many bytes together (one is always
# let through), and at most this many scrapes render or wait for a render thread at once;
# past either a scrape is answered 503 (``busy``).
MAX_BODY_BYTES = 128 << 20
MAX_RENDERING = 4
# A connection must send its first request's headers within this long (then it is served,
# or it is closed); connections still sending headers are held up to LOBBY_PER_CONNECTION
# times --web.max-connections, the oldest pushed out by a new one.
HEADER_TIMEOUT_S = 5.0
LOBBY_PER_CONNECTION = 4
# Request headers larger than this are refused (431): aiohttp's own line and field limits
# are 8190 bytes; a request never needs more than a few of them.
_MAX_HEADER_BYTES = 32 << 10
# A response its client has not read from for this long gives its bytes up to a scrape
# that needs them (the client is disconnected).
STALL_S = 1.0
# Keep-alive: a connection idle this long after a response is closed (aiohttp's timer).
_KEEPALIVE_S = 15.0
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE = re.compile(rb"([A-Z]+) ([^ ?#\r\n]*)[^ \r\n]* HTTP/1\.[01]\r?\n")
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


def _plain(status: str, body: bytes, head: bool = False) -> bytes:
    """A whole HTTP/1.1 response that closes its connection."""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + (b"" if head else body)


class _Lobby(asyncio.Protocol):
    """A connection until its first request's headers are in (see the module docstring)."""

    def __init__(self, server: WebServer) -> None:
        self._server = server
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT_S, self.expire)
        self._server._lobby_enter(self)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        start = max(0, len(buf) - 3)
        buf += data
        if _END_OF_HEADERS.search(buf, start) is None:
            if len(buf) > _MAX_HEADER_BYTES:
                self._leave()
                self.transport.write(_plain("431 Request Header Fields Too Large", b"too large\n"))
                self.transport.close()
            return
        self._leave()
        self._server._admit(self.transport, bytes(buf))

    def eof_received(self) -> bool:
        self._leave()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    def expire(self) -> None:
        """Out of time (or pushed out of a full lobby): closed, counted."""
        if self._leave():
            self._server.header_timeouts += 1
            self.transport.abort()

    def _leave(self) -> bool:
        """Out of the lobby; False if it was already."""
        if self._timer is None:
            return False
        self._timer.cancel()
        self._timer = None
        self._server._lobby.pop(self, None)
        return True


class _BadRequests(logging.Filter):
    """aiohttp logs a client's malformed request at error with its parser's traceback: a
    client's fault, not the daemon's. Such a record is counted (``bad_requests``) and
    logged at debug in one line instead (aiohttp logs the first request of a connection
    that is not HTTP at debug itself: counted too); every other record passes if the
    daemon's level lets it."""

    def __init__(self, server: WebServer) -> None:
        super().__init__()
        self._server = server

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return record.levelno >= _log.getEffectiveLevel()
        self._server.bad_requests += 1
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("bad request (400): %s", " ".join(str(exc.message).split())[:200])
        return False


class WebServer:
    """Serves the exposition at ``path``; ``ready()`` decides ``/-/ready``.

    Per scrape: ``snapshot()`` on the loop thread, then ``render(snapshot, fmt)`` on a
    worker thread, in the format the ``Accept`` header prefers by q-value
    (``textformat.negotiate``, once per scrape: OpenMetrics or text), gzipped when
    ``Accept-Encoding`` admits it. ``refused``, ``write_timeouts`` and ``busy`` count
    connections turned away by the cap, responses abandoned by the write timeout, and
    scrapes turned away because bodies in flight would pass ``max_body_bytes``;
    ``header_timeouts`` and ``preempted`` connections closed without a complete request and
    responses given up for a scrape that needed their bytes.
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
        keepalive_timeout_s: float = _KEEPALIVE_S,
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
        # Connections closed without a complete request within HEADER_TIMEOUT_S (or pushed
        # out of a full lobby); responses given up for a scrape that needed their bytes.
        self.header_timeouts = 0
        self.preempted = 0
        # Requests that are not HTTP or have a malformed header (aiohttp answers 400):
        # counted, and logged at debug in a line, not at error with a traceback.
        self.bad_requests = 0
        self._http_log = logging.Logger("esper_telemetry.daemon.http")
        self._http_log.parent = _log
        self._http_log.setLevel(logging.DEBUG)  # every record reaches the filter
        self._http_log.addFilter(_BadRequests(self))
        self._lobby: OrderedDict[_Lobby, None] = OrderedDict()
        self._active: set[Any] = set()  # aiohttp handlers with a request in progress
        # Responses being written, by id(request): (request, [bytes held, last progress]).
        self._writers: dict[int, tuple[web.BaseRequest, list]] = {}
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
            logger=self._http_log,
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
        return _Lobby(self)

    def _lobby_enter(self, lobby: _Lobby) -> None:
        waiting = self._lobby
        while len(waiting) >= LOBBY_PER_CONNECTION * self._max_connections:
            next(iter(waiting)).expire()  # the oldest gives way
        waiting[lobby] = None

    def _admit(self, transport: asyncio.Transport, head: bytes) -> None:
        """A connection whose first request's headers are in: handed to aiohttp's server if
        a slot is free; if not, a health check is answered here, and anything else takes
        the slot of a connection between requests, or is answered 503."""
        assert self._http is not None
        full = len(self._http.connections) >= self._max_connections
        m = _REQUEST_LINE.match(head) if full else None
        if m is not None and m.group(2) in (b"/-/healthy", b"/-/ready"):
            if m.group(1) in (b"GET", b"HEAD"):
                if m.group(2) == b"/-/healthy":
                    answer = _plain("200 OK", b"Healthy.\n", m.group(1) == b"HEAD")
                elif self._ready():
                    answer = _plain("200 OK", b"Ready.\n", m.group(1) == b"HEAD")
                else:
                    answer = _plain("503 Service Unavailable", b"Not ready.\n")
                transport.write(answer)
                transport.close()
                return
        if full:
            idle = next((h for h in self._http.connections if h not in self._active), None)
            if idle is None:
                self.refused += 1
                transport.write(_BUSY)
                transport.close()
                return
            idle.force_close()  # between requests: its client reconnects when it needs to
        handler = self._http()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(head)

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
        handler = request.protocol
        self._active.add(handler)
        try:
            return await self._respond(request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # a bug; answer 500 rather than drop the connection silently
            self._log.exception("error answering an HTTP request")
            return web.Response(status=500, text="internal error\n")
        finally:
            self._active.discard(handler)

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
        if self._held and self._held + guess > self._max_body_bytes:
            self._preempt(guess)
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
        return await self._answer(request, body, ctype, gz)  # it releases len(body)

    async def _answer(
        self, request: web.BaseRequest, body: bytes, ctype: str, gz: bool
    ) -> web.StreamResponse:
        # What the body holds of max_body_bytes (0 once released) and when its client last
        # took a chunk: _preempt may release it first.
        writer = [len(body), asyncio.get_running_loop().time()]
        self._writers[id(request)] = (request, writer)
        try:
            # The body depends on both headers: caches must key on both.
            resp = web.StreamResponse(
                headers={"Content-Type": ctype, "Vary": "Accept, Accept-Encoding"}
            )
            if gz:
                resp.headers["Content-Encoding"] = "gzip"
            resp.content_length = len(body)
            await asyncio.wait_for(self._send(request, resp, body, writer), self._write_timeout_s)
        except asyncio.TimeoutError:
            self.write_timeouts += 1
            if request.transport is not None:
                request.transport.abort()  # frees what the transport still buffers
            if self._trim is None:  # once the abandoned bodies are gone, hand memory back
                self._trim = asyncio.get_running_loop().call_later(0.5, self._trimmed)
            raise ConnectionResetError("write timeout") from None
        finally:
            del self._writers[id(request)]
            self._held -= writer[0]
        self.scraped.set()
        return resp

    def _preempt(self, need: int) -> None:
        """Give up the responses whose clients have not read for ``STALL_S``, the longest
        stalled first, until ``need`` more bytes fit in ``max_body_bytes``."""
        cutoff = asyncio.get_running_loop().time() - STALL_S
        stalled = sorted(
            (w[1], key) for key, (_, w) in self._writers.items() if w[1] <= cutoff and w[0]
        )
        for _, key in stalled:
            if self._held + need <= self._max_body_bytes:
                break
            request, writer = self._writers[key]
            self._held -= writer[0]
            writer[0] = 0  # released here; _answer's own release then takes nothing
            self.preempted += 1
            if request.transport is not None:
                request.transport.abort()
        if stalled and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(0.5, self._trimmed)

    def _trimmed(self) -> None:
        self._trim = None
        _TRIM()

    @staticmethod
    async def _send(
        request: web.BaseRequest, resp: web.StreamResponse, body: bytes, writer: list
    ) -> None:
        loop = asyncio.get_running_loop()
        await resp.prepare(request)
        if request.method != "HEAD":
            view = memoryview(body)
            for i in range(0, len(view), _CHUNK):
                await resp.write(view[i : i + _CHUNK])
                writer[1] = loop.time()  # the client took that chunk: progress
        await resp.write_eof()

    def _render(self, snapshot: Any, fmt: str, gz: bool) -> bytes:
        """On a worker thread: the exposition of ``snapshot`` in ``fmt``, gzipped if ``gz``."""
        body = self._render_body(snapshot, fmt)
        return gzip.compress(body, compresslevel=1) if gz else body
