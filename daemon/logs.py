"""One-line log records on stderr, logfmt style (``ts=... level=... logger=... msg="..."``).

One record is one line whatever it carries: newlines in messages and tracebacks are
escaped, so log shippers never split a record.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["setup_logging", "LogfmtFormatter"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "error": logging.ERROR}
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
          logging.ERROR: "error", logging.CRITICAL: "error"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\r", "\\r") + '"'


class LogfmtFormatter(logging.Formatter):
    """Formats a record as one logfmt line, UTC timestamps with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        level = _NAMES.get(record.levelno, record.levelname.lower())
        return (f"ts={ts}.{int(record.msecs):03d}Z level={level} logger={record.name} "
                f"msg={_quote(msg)}")


def setup_logging(level: str, stream: TextIO = sys.stderr) -> logging.Logger:
    """Route the ``daemon`` logger to ``stream`` at ``level``; returns it."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("esper_telemetry.daemon")
    logger.handlers[:] = [handler]
    logger.setLevel(_LEVELS[level])
    logger.propagate = False
    return logger
