"""Names, defaults and units shared by the collector and the daemon.

Every ``ESPER_*`` environment variable either side reads is named here, so an operator
can find them all in one place. Resolution order everywhere: explicit argument, then the
environment variable, then the default below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_ZMQ_LISTEN_ADDRESS",
    "DEFAULT_WEB_LISTEN_ADDRESS",
    "DEFAULT_ZMQ_PORT",
    "DEFAULT_WEB_PORT",
    "ENV_RUN",
    "ENV_ENDPOINT",
    "ENV_SERVER_PUBLIC_KEY_FILE",
    "ENV_CLIENT_SECRET_KEY_FILE",
    "ENV_ZMQ_CURVE_SECRET_KEY_FILE",
    "ENV_ZMQ_CURVE_AUTHORIZED_KEYS_DIR",
    "ENV_WEB_CONFIG_FILE",
    "ENV_WEB_WRITE_TIMEOUT_SECONDS",
    "ENV_WEB_MAX_CONNECTIONS",
    "ENV_WEB_MAX_SERIES",
    "DEFAULT_WEB_WRITE_TIMEOUT_SECONDS",
    "DEFAULT_WEB_MAX_CONNECTIONS",
    "DEFAULT_WEB_MAX_SERIES",
    "ENV_ZMQ_LISTEN_ADDRESS",
    "ENV_ZMQ_MAX_MESSAGE_BYTES",
    "ENV_ZMQ_RECEIVE_BUFFER_BYTES",
    "DEFAULT_ZMQ_RECEIVE_BUFFER_BYTES",
    "DEFAULT_ZMQ_MAX_MESSAGE_BYTES",
    "COLLECTOR_MESSAGE_BYTES",
    "ENV_WEB_LISTEN_ADDRESS",
    "ENV_WEB_TELEMETRY_PATH",
    "ENV_RUN_TTL_SECONDS",
    "ENV_RUN_ENDED_RETENTION_SECONDS",
    "ENV_RUN_EVICT_AFTER_SECONDS",
    "ENV_MAX_RUNS",
    "ENV_MAX_GROUPS_PER_RUN",
    "ENV_MAX_RANKS_PER_RUN",
    "ENV_QUEUE_SIZE",
    "ENV_LOG_LEVEL",
    "ENV_LOG_FORMAT",
    "ENV_SHARD_WINDOW_SECONDS",
    "ENV_SHUTDOWN_TIMEOUT_SECONDS",
    "ENV_SHUTDOWN_LINGER_SECONDS",
    "DEFAULT_WEB_TELEMETRY_PATH",
    "DEFAULT_RUN_TTL_SECONDS",
    "DEFAULT_RUN_ENDED_RETENTION_SECONDS",
    "DEFAULT_RUN_EVICT_AFTER_SECONDS",
    "DEFAULT_MAX_RUNS",
    "DEFAULT_MAX_GROUPS_PER_RUN",
    "DEFAULT_MAX_RANKS_PER_RUN",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_LOG_LEVEL",
    "DEFAULT_LOG_FORMAT",
    "DEFAULT_SHARD_WINDOW_SECONDS",
    "DEFAULT_SHUTDOWN_TIMEOUT_SECONDS",
    "DEFAULT_SHUTDOWN_LINGER_SECONDS",
    "MAX_MESSAGE_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_STRING_CHARS",
    "MAX_GROUPS_PER_EVENT",
    "MAX_DEVICES_PER_EVENT",
    "env_str",
    "lookup",
]

DEFAULT_ZMQ_PORT = 5569
DEFAULT_WEB_PORT = 9469
# The collector connects here; the daemon binds here. Loopback by default: exposing
# either to a network is a deliberate act (and between machines wants CURVE keys).
DEFAULT_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_ZMQ_PORT}"
DEFAULT_ZMQ_LISTEN_ADDRESS = DEFAULT_ENDPOINT
DEFAULT_WEB_LISTEN_ADDRESS = f"127.0.0.1:{DEFAULT_WEB_PORT}"

ENV_RUN = "ESPER_RUN"
ENV_ENDPOINT = "ESPER_TELEMETRY_ENDPOINT"
# CURVE on the collector's socket: the daemon's public certificate, the collector's secret one.
ENV_SERVER_PUBLIC_KEY_FILE = "ESPER_TELEMETRY_SERVER_PUBLIC_KEY_FILE"
ENV_CLIENT_SECRET_KEY_FILE = "ESPER_TELEMETRY_CLIENT_SECRET_KEY_FILE"
# The daemon's side: its secret certificate, the directory of admitted collectors' keys,
# and the exporter toolkit's web configuration (TLS, basic auth).
ENV_ZMQ_CURVE_SECRET_KEY_FILE = "ESPER_ZMQ_CURVE_SECRET_KEY_FILE"
ENV_ZMQ_CURVE_AUTHORIZED_KEYS_DIR = "ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR"
ENV_WEB_CONFIG_FILE = "ESPER_WEB_CONFIG_FILE"
ENV_WEB_WRITE_TIMEOUT_SECONDS = "ESPER_WEB_WRITE_TIMEOUT_SECONDS"
ENV_WEB_MAX_CONNECTIONS = "ESPER_WEB_MAX_CONNECTIONS"
ENV_WEB_MAX_SERIES = "ESPER_WEB_MAX_SERIES"
ENV_ZMQ_LISTEN_ADDRESS = "ESPER_ZMQ_LISTEN_ADDRESS"
ENV_ZMQ_MAX_MESSAGE_BYTES = "ESPER_ZMQ_MAX_MESSAGE_BYTES"
ENV_ZMQ_RECEIVE_BUFFER_BYTES = "ESPER_ZMQ_RECEIVE_BUFFER_BYTES"
ENV_WEB_LISTEN_ADDRESS = "ESPER_WEB_LISTEN_ADDRESS"
ENV_WEB_TELEMETRY_PATH = "ESPER_WEB_TELEMETRY_PATH"
ENV_RUN_TTL_SECONDS = "ESPER_RUN_TTL_SECONDS"
ENV_RUN_ENDED_RETENTION_SECONDS = "ESPER_RUN_ENDED_RETENTION_SECONDS"
ENV_RUN_EVICT_AFTER_SECONDS = "ESPER_RUN_EVICT_AFTER_SECONDS"
ENV_MAX_RUNS = "ESPER_LIMITS_MAX_RUNS"
ENV_MAX_GROUPS_PER_RUN = "ESPER_LIMITS_MAX_GROUPS_PER_RUN"
ENV_MAX_RANKS_PER_RUN = "ESPER_LIMITS_MAX_RANKS_PER_RUN"
ENV_QUEUE_SIZE = "ESPER_QUEUE_SIZE"
ENV_LOG_LEVEL = "ESPER_LOG_LEVEL"
ENV_LOG_FORMAT = "ESPER_LOG_FORMAT"
ENV_SHARD_WINDOW_SECONDS = "ESPER_SHARD_WINDOW_SECONDS"
ENV_SHUTDOWN_TIMEOUT_SECONDS = "ESPER_SHUTDOWN_TIMEOUT_SECONDS"
ENV_SHUTDOWN_LINGER_SECONDS = "ESPER_SHUTDOWN_LINGER_SECONDS"

# Daemon defaults (flag ``--x.y`` <-> ``ESPER_X_Y``; see docs/daemon.md).
DEFAULT_WEB_TELEMETRY_PATH = "/metrics"
# HTTP bounds: a response not read within the write timeout is abandoned (its memory freed);
# connections past the cap get a 503 and are closed.
DEFAULT_WEB_WRITE_TIMEOUT_SECONDS = 10.0
DEFAULT_WEB_MAX_CONNECTIONS = 64
# The series one scrape carries, the daemon's own included; past it whole runs are left out
# (counted). 50,000 series render in about 40 ms on the 2-core reference box and make about
# 3 MB of text with typical names (about 27 MB at the wire's 256-character name limit), so
# the render threads and the bodies in flight (at most 128 MiB, daemon/web.py) stay well
# under the daemon's 512 MiB RSS target (318 MiB peak measured with long names and 24
# clients that never read); the default run and group caps alone allow about 130,000
# series with long names (70 MB). See docs/daemon.md.
DEFAULT_WEB_MAX_SERIES = 50_000
# A run with no event for this long is dropped from the exposition. Collectors send a
# heartbeat every few seconds, so only a dead or disconnected job goes this quiet.
DEFAULT_RUN_TTL_SECONDS = 300.0
# A run whose every rank said goodbye stays exported this long (marked ended), so a short
# job's final values reach a scrape; 0 drops it at once.
DEFAULT_RUN_ENDED_RETENTION_SECONDS = 300.0
# With the run table full, a run that sent norms gives way to a new run only once it has
# been this long without an event (twelve of the collector's 5 s heartbeats).
DEFAULT_RUN_EVICT_AFTER_SECONDS = 60.0
DEFAULT_MAX_RUNS = 100
DEFAULT_MAX_GROUPS_PER_RUN = 128
DEFAULT_MAX_RANKS_PER_RUN = 4096
# Receiver -> aggregator queue capacity, in events (not messages).
DEFAULT_QUEUE_SIZE = 65536
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "logfmt"
# How long the daemon waits for every rank's shard of a sharded group's step.
DEFAULT_SHARD_WINDOW_SECONDS = 30.0
# Graceful shutdown: deadline to drain the queue, then how long /metrics keeps answering
# (ended early by the first scrape after the drain) so a last scrape sees final values.
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 10.0
DEFAULT_SHUTDOWN_LINGER_SECONDS = 0.0

# Wire limits. The daemon also sets MAX_MESSAGE_BYTES as the socket's ZMQ_MAXMSGSIZE so an
# oversize frame is dropped by libzmq before Python ever allocates it.
MAX_MESSAGE_BYTES = 1 << 20
# A collector splits a batch that encodes larger than this into smaller messages (an event
# larger than it goes alone; it takes 256 groups with long multi-byte names to get there).
COLLECTOR_MESSAGE_BYTES = 128 << 10
# The daemon's frame limit (ZMQ_MAXMSGSIZE): twice the largest batch a collector sends.
DEFAULT_ZMQ_MAX_MESSAGE_BYTES = 256 << 10
# What libzmq may buffer per connected collector, in bytes: the receive high-water mark is
# this over the frame limit (128 messages of 256 KiB), so a flood of max-size frames holds
# at most this much per sender. Measured (bench/daemon_ingest.py, saturated): libzmq
# sometimes resumes a full pipe slowly (a trial at 10,000-15,000 events/s instead of about
# 180,000): 4 of 10 batched trials at a mark of 32 messages (1 MiB frames), 1 of 10 at 128.
DEFAULT_ZMQ_RECEIVE_BUFFER_BYTES = 32 << 20
MAX_BATCH_EVENTS = 4096
MAX_STRING_CHARS = 256
MAX_GROUPS_PER_EVENT = 256
MAX_DEVICES_PER_EVENT = 64


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


def env_str(name: str, default: str, explicit: str | None = None) -> str:
    """Explicit value, else environment variable ``name`` if set and non-empty, else ``default``."""
    return lookup(name, default, explicit)[0]
