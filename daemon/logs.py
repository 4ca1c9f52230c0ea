"""One-line log records on stderr, in a bounded number of lines whatever happens.

Format: ``logfmt`` (``ts=... level=... logger=... msg="..."``, the default) or ``json`` (one
object per line). One record is one line whatever it carries: newlines in messages and
tracebacks are escaped, so log shippers never split a record. Every logger goes through
the same handler, asyncio's included (at the file-descriptor limit it logs a traceback
per failed accept).

The budget: within each window (a minute), at most ``per_kind`` records of one kind (the
same logger and message template: every "collector hello" is one kind) and ``total``
records in all are written; the rest are counted, and when the window ends a summary line
per suppressed kind (at most ``per_kind`` of them, then one line for the rest) says how
many were left out. A flood of any kind thus writes at most about ``total + 2 * per_kind``
lines a minute.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["setup_logging", "LogfmtFormatter", "JsonFormatter", "BudgetHandler", "LOG_FORMATS"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}

WINDOW_S = 60.0
PER_KIND = 5
TOTAL = 100
_MAX_KINDS = 1000  # kinds told apart per window; the rest share one bucket
_OTHER = ("", "other")


def _quote(text: str) -> str:
    return (
        '"'
        + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        + '"'
    )


def _fields(formatter: logging.Formatter, record: logging.LogRecord) -> tuple[str, str, str]:
    ts = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )
    msg = record.getMessage()
    if record.exc_info:
        msg = f"{msg}\n{formatter.formatException(record.exc_info)}"
    return ts, _NAMES.get(record.levelno, record.levelname.lower()), msg


class LogfmtFormatter(logging.Formatter):
    """Formats a record as one logfmt line, UTC timestamps with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        ts, level, msg = _fields(self, record)
        return f"ts={ts} level={level} logger={record.name} msg={_quote(msg)}"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``ts``, ``level``, ``logger``, ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        ts, level, msg = _fields(self, record)
        return json.dumps(
            {"ts": ts, "level": level, "logger": record.name, "msg": msg}, ensure_ascii=False
        )


LOG_FORMATS = {"logfmt": LogfmtFormatter, "json": JsonFormatter}


class BudgetHandler(logging.StreamHandler):
    """A stream handler that writes at most a budget of records per window (see the module doc)."""

    def __init__(
        self,
        stream: TextIO,
        per_kind: int = PER_KIND,
        total: int = TOTAL,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(stream)
        self._per_kind, self._total, self._window_s, self._clock = per_kind, total, window_s, clock
        self._budget_lock = threading.Lock()
        self._start = clock()
        self._written = 0
        self._kinds: dict[tuple[str, object], int] = {}  # records seen this window, by kind
        self._suppressed: dict[tuple[str, object], tuple[int, logging.LogRecord]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        with self._budget_lock:
            summaries = self._roll(self._clock())
            kind = (record.name, record.msg)
            if kind not in self._kinds and len(self._kinds) >= _MAX_KINDS:
                kind = _OTHER  # messages built at run time: one bucket, so memory stays bounded
            seen = self._kinds[kind] = self._kinds.get(kind, 0) + 1
            allowed = seen <= self._per_kind and self._written < self._total
            if allowed:
                self._written += 1
            else:
                count, first = self._suppressed.get(kind, (0, record))
                self._suppressed[kind] = (count + 1, first)
        for summary in summaries:
            super().emit(summary)
        if allowed:
            super().emit(record)

    def flush_summaries(self) -> None:
        """Write the summaries of the current window now (at shutdown)."""
        with self._budget_lock:
            summaries = self._roll(None)
        for summary in summaries:
            super().emit(summary)

    def _roll(self, now):
        """At a window's end (or ``now`` None): reset, returning the summary records to write."""
        if now is not None and now - self._start < self._window_s:
            return []
        suppressed, self._suppressed = self._suppressed, {}
        self._kinds.clear()
        self._written = 0
        if now is not None:
            self._start = now
        out = []
        ordered = sorted(suppressed.items(), key=lambda item: -item[1][0])
        for kind, (count, first) in ordered[: self._per_kind]:
            if kind == _OTHER:
                text = f"{count} records of many other kinds left out of the log in the last window"
            else:
                text = (
                    f"{count} more like this left out of the log in the last window (at most "
                    f"{self._per_kind} of a kind, {self._total} in all, per {self._window_s:g} s): "
                    f"{first.getMessage()}"
                )
            out.append(_summary(first, text))
        rest = ordered[self._per_kind :]
        if rest:
            out.append(
                _summary(
                    rest[0][1][1],
                    f"{sum(c for _, (c, _) in rest)} records of {len(rest)} "
                    f"more kinds left out of the log in the last window",
                )
            )
        return out

    def close(self) -> None:
        self.flush_summaries()
        super().close()


def _summary(like: logging.LogRecord, text: str) -> logging.LogRecord:
    return logging.LogRecord(
        like.name,
        max(like.levelno, logging.WARNING),
        like.pathname,
        like.lineno,
        text.replace("%", "%%"),
        None,
        None,
    )


def setup_logging(level: str, stream: TextIO = sys.stderr, fmt: str = "logfmt") -> logging.Logger:
    """Route every logger to one budgeted handler on ``stream``; the daemon's at ``level``.

    Other libraries' loggers (asyncio, zmq) pass at warning and above, in the same format
    and under the same budget. Returns the daemon's logger.
    """
    handler = BudgetHandler(stream)
    handler.setFormatter(LOG_FORMATS[fmt]())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BudgetHandler):
            old.flush_summaries()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logger = logging.getLogger("esper_telemetry.daemon")
    logger.handlers[:] = []
    logger.setLevel(_LEVELS[level])
    logger.propagate = True
    return logger
