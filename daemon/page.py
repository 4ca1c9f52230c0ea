"""The live page and its JSON API, served next to ``/metrics`` by ``web.WebServer``.

Paths (docs/daemon.md, "The live page and the JSON API"):

- ``/``: the runs and their health; each links to ``runs/<run>``.
- ``/runs/<run>``: a run's groups' norms against the step, the seeds' ratios, violations
  and non-finite steps marked, polled live.
- ``/static/...``: the page's scripts and style, read once from the installed package (no
  CDN, no network; the chart is ``static/chart.js``, a canvas renderer of our own).
- ``/api/v1/runs`` and ``/api/v1/runs/<run>/history``: JSON (``api.py``).

``WebServer`` asks ``respond`` first for every path it does not serve itself, after its
basic-auth check, so the page and the API sit behind the same ``--web.config.file`` as
``/metrics``. Data comes from two callables the wiring hands over (``daemon/app.py``):
``snapshot()`` (the scrape's) and ``history(run)`` (``Aggregator.history``), both called
on the loop thread; the documents are built and encoded on a worker thread, and at most
``MAX_IN_FLIGHT`` of them are built or written at once (more are answered 503 and
``Retry-After``), each write bounded by the web server's write timeout.

Names of runs and groups are user input: the pages are static files that put them in the
document only as text (``textContent``, the canvas's ``fillText``), never as markup, and a
Content-Security-Policy forbids inline script; links carry them percent-encoded.
"""

from __future__ import annotations

import asyncio
import gzip
import html
import importlib.resources
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from aiohttp import web

from esper_telemetry.version import __version__

from . import api
from .snapshot import Snapshot
from .steps import RunHistory
from .web import accepts_gzip

__all__ = ["Pages", "MAX_IN_FLIGHT", "STATIC_FILES"]

_log = logging.getLogger(__name__)

# Documents built or being written at once; more are answered 503 (each holds at most a few
# MB: 128 groups x 1,024 steps with ratios is about 6.5 MB of JSON).
MAX_IN_FLIGHT = 4
# Bodies above this size are gzipped when the client accepts it.
_GZIP_FROM = 1 << 14
_CHUNK = 1 << 16

STATIC_FILES = {
    "style.css": "text/css; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "runs.js": "text/javascript; charset=utf-8",
    "run.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
_PAGES = ("index.html", "run.html")
_JSON = "application/json; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_SECURITY = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_API = "/api/v1/runs"


def _read_static() -> dict[str, bytes]:
    root = importlib.resources.files("esper_telemetry.daemon") / "static"
    return {name: (root / name).read_bytes() for name in (*STATIC_FILES, *_PAGES)}


class _BadRequest(ValueError):
    pass


def _int_param(query: Any, name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer, got {raw[:40]!r}") from None
    if name == "last" and value < 1:
        raise _BadRequest("last must be >= 1")
    return value


class Pages:
    """Answers the page's and the API's paths; ``respond`` returns None for any other."""

    def __init__(
        self,
        history: Callable[[str], RunHistory | None],
        snapshot: Callable[[], Snapshot],
        metrics_path: str = "/metrics",
        clock: Callable[[], float] = time.time,
        logger: logging.Logger = _log,
    ) -> None:
        self._history = history
        self._snapshot = snapshot
        self._clock = clock
        self._log = logger
        files = _read_static()
        # The landing page names the telemetry path (operator configuration: escaped), as a
        # relative link so a prefix added by a reverse proxy is kept.
        metrics = html.escape("." + metrics_path, quote=True).encode()
        files["index.html"] = (
            files["index.html"]
            .replace(b"{{metrics}}", metrics)
            .replace(b"{{version}}", html.escape(__version__).encode())
        )
        self._files = files
        self.in_flight = 0
        self.busy = 0  # documents answered 503 because MAX_IN_FLIGHT were under way
        self.write_timeouts = 0

    async def respond(
        self, request: web.BaseRequest, write_timeout_s: float
    ) -> web.StreamResponse | None:
        path = request.rel_url.raw_path
        if path == "/":
            return self._file("index.html", _HTML)
        if path.startswith("/runs/") and "/" not in path[6:]:  # /runs/?run=NAME too
            return self._file("run.html", _HTML)
        if path.startswith("/static/"):
            name = path[8:]
            if name in STATIC_FILES:
                return self._file(name, STATIC_FILES[name])
            return web.Response(status=404, text="not found\n")
        if path == "/favicon.ico":
            return self._file("icon.svg", STATIC_FILES["icon.svg"])
        if path == _API or path.startswith(_API + "/"):
            return await self._api(request, path, write_timeout_s)
        if path.startswith("/api/"):
            return _error(404, "no such API path")
        return None

    def _file(self, name: str, ctype: str) -> web.Response:
        headers = {"Cache-Control": "no-cache", **_SECURITY}
        return web.Response(body=self._files[name], headers={"Content-Type": ctype, **headers})

    async def _api(
        self, request: web.BaseRequest, path: str, write_timeout_s: float
    ) -> web.StreamResponse:
        run: str | None = None
        if path != _API:
            rest = path[len(_API) + 1 :]
            encoded, sep, tail = rest.partition("/")
            if not sep or tail != "history" or not encoded:
                return _error(404, "no such API path")
            run = urllib.parse.unquote(encoded)
        try:
            since = _int_param(request.rel_url.query, "since")
            folded_since = _int_param(request.rel_url.query, "folded_since")
            last = _int_param(request.rel_url.query, "last")
        except _BadRequest as exc:
            return _error(400, str(exc))
        if self.in_flight >= MAX_IN_FLIGHT:
            self.busy += 1
            resp = _error(503, "busy: too many documents in flight, try again")
            resp.headers["Retry-After"] = "1"
            resp.force_close()
            return resp
        gz = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        self.in_flight += 1
        try:
            # On the loop: one consistent instant, detached copies (nothing live leaves it).
            if run is None:
                snapshot = self._snapshot()
                now = self._clock()

                def build() -> bytes:
                    return api.encode(api.runs_document(snapshot, now))
            else:
                history = self._history(run)
                if history is None:
                    return _error(404, "unknown run", run=run)

                def build() -> bytes:
                    return api.encode(api.history_document(history, since, last, folded_since))

            body = await asyncio.get_running_loop().run_in_executor(None, _gzipped, build, gz)
            gz = gz and len(body) >= 2 and body[:2] == b"\x1f\x8b"
            return await self._write(request, body, gz, write_timeout_s)
        finally:
            self.in_flight -= 1

    async def _write(
        self, request: web.BaseRequest, body: bytes, gz: bool, timeout_s: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": _JSON,
                "Cache-Control": "no-store",
                "Vary": "Accept-Encoding",
                "X-Content-Type-Options": "nosniff",
            }
        )
        if gz:
            resp.headers["Content-Encoding"] = "gzip"
        resp.content_length = len(body)
        try:
            await asyncio.wait_for(_send(request, resp, body), timeout_s)
        except asyncio.TimeoutError:
            self.write_timeouts += 1
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("write timeout") from None
        return resp


async def _send(request: web.BaseRequest, resp: web.StreamResponse, body: bytes) -> None:
    """The body in 64 KiB chunks, each waiting for the peer to read (a client that does not
    read holds one body and about a chunk of copy, until the write timeout)."""
    await resp.prepare(request)
    if request.method != "HEAD":
        view = memoryview(body)
        for i in range(0, len(view), _CHUNK):
            await resp.write(view[i : i + _CHUNK])
    await resp.write_eof()


def _gzipped(build: Callable[[], bytes], gz: bool) -> bytes:
    """On a worker thread: the document, gzipped when asked and worth it (a gzip body
    starts with its magic number, which JSON never does)."""
    body = build()
    if gz and len(body) >= _GZIP_FROM:
        return gzip.compress(body, compresslevel=1)
    return body


def _error(status: int, message: str, **extra: str) -> web.Response:
    body = json.dumps({"error": message, **extra}, ensure_ascii=False).encode()
    return web.Response(
        status=status,
        body=body,
        headers={"Content-Type": _JSON, "Cache-Control": "no-store", **_SECURITY},
    )
