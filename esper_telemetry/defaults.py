"""What the collector and the daemon share: where they meet, the wire's limits, and the
rule that resolves a setting.

Only what both sides (or the daemon and its clients, such as ``top``) must agree on lives
here: the default endpoints, the collector's own variables, the sizes every message is
bounded by. The daemon's settings (their variables, defaults and bounds) are declared once
each, as rows of ``esper_telemetry.daemon.config.Config``; the collector's are its
``attach`` arguments. Resolution order everywhere (``lookup``): explicit argument, then the
environment variable, then the default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_ZMQ_PORT",
    "DEFAULT_WEB_PORT",
    "DEFAULT_WEB_TELEMETRY_PATH",
    "ENV_RUN",
    "ENV_ENDPOINT",
    "ENV_SERVER_PUBLIC_KEY_FILE",
    "ENV_CLIENT_SECRET_KEY_FILE",
    "COLLECTOR_MESSAGE_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_STRING_CHARS",
    "MAX_GROUPS_PER_EVENT",
    "MAX_DEVICES_PER_EVENT",
    "MAX_PIECES_PER_GROUP",
    "lookup",
]

DEFAULT_ZMQ_PORT = 5569
DEFAULT_WEB_PORT = 9469
# The collector connects here; the daemon binds here. Loopback by default: exposing
# either to a network is a deliberate act (and between machines wants CURVE keys).
DEFAULT_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_ZMQ_PORT}"
# Where the daemon serves the exposition by default (``top`` reads it there).
DEFAULT_WEB_TELEMETRY_PATH = "/metrics"

# The collector's variables.
ENV_RUN = "ESPER_RUN"
ENV_ENDPOINT = "ESPER_TELEMETRY_ENDPOINT"
# CURVE on the collector's socket: the daemon's public certificate, the collector's secret one.
ENV_SERVER_PUBLIC_KEY_FILE = "ESPER_TELEMETRY_SERVER_PUBLIC_KEY_FILE"
ENV_CLIENT_SECRET_KEY_FILE = "ESPER_TELEMETRY_CLIENT_SECRET_KEY_FILE"

# Wire limits. The daemon refuses a frame over its --zmq.max-message-bytes (at most
# MAX_MESSAGE_BYTES) in libzmq, before Python ever allocates it.
MAX_MESSAGE_BYTES = 1 << 20
# A collector splits a batch that encodes larger than this into smaller messages (an event
# larger than it goes alone; it takes 256 groups with long multi-byte names to get there).
# The daemon's default frame limit is twice this.
COLLECTOR_MESSAGE_BYTES = 128 << 10
MAX_BATCH_EVENTS = 4096
MAX_STRING_CHARS = 256
MAX_GROUPS_PER_EVENT = 256
MAX_DEVICES_PER_EVENT = 64
# A group declaration's sample of what the rank counts (schema 3: the smallest hashes of its
# plain parameters), so the daemon can tell ranks that share part of a group.
MAX_PIECES_PER_GROUP = 512


def lookup(
    name: str,
    default: str,
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """The value to use and where it came from: ``"argument"``, ``"environment"`` or ``"default"``.

    The one resolution rule of both sides: the explicit value when given, else the
    variable ``name`` when set and non-empty (``environ``, default ``os.environ``), else
    ``default``. The source lets an error name what the user actually wrote.
    """
    if explicit is not None:
        return explicit, "argument"
    value = (os.environ if environ is None else environ).get(name, "")
    if value:
        return value, "environment"
    return default, "default"
