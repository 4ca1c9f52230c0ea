"""The daemon's configuration: flags, their ``ESPER_*`` environment equivalents, validation.

Resolution order for every setting: the flag, then the environment variable, then the
default; names and defaults live in ``esper_telemetry.defaults``. Invalid configuration is
the one fatal input (a ``ConfigError`` with a one-line reason); bad events never are.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

from esper_telemetry import defaults as d
from esper_telemetry.version import __version__

__all__ = ["Config", "ConfigError", "parse_args", "build_parser", "LOG_LEVELS"]

LOG_LEVELS = ("debug", "info", "warn", "error")


class ConfigError(ValueError):
    """Invalid configuration; the message is one line naming the setting."""


@dataclass(frozen=True)
class Config:
    """Validated settings; durations in seconds, sizes in events, counts as given."""

    zmq_listen_addresses: Tuple[str, ...] = (d.DEFAULT_ZMQ_LISTEN_ADDRESS,)
    web_host: str = "127.0.0.1"
    web_port: int = d.DEFAULT_WEB_PORT
    telemetry_path: str = d.DEFAULT_WEB_TELEMETRY_PATH
    run_ttl_s: float = d.DEFAULT_RUN_TTL_SECONDS
    max_runs: int = d.DEFAULT_MAX_RUNS
    max_groups_per_run: int = d.DEFAULT_MAX_GROUPS_PER_RUN
    max_ranks_per_run: int = d.DEFAULT_MAX_RANKS_PER_RUN
    queue_size: int = d.DEFAULT_QUEUE_SIZE
    shard_window_s: float = d.DEFAULT_SHARD_WINDOW_SECONDS
    shutdown_timeout_s: float = d.DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    shutdown_linger_s: float = d.DEFAULT_SHUTDOWN_LINGER_SECONDS
    log_level: str = d.DEFAULT_LOG_LEVEL
    check_config: bool = False

    @property
    def web_listen_address(self) -> str:
        host = f"[{self.web_host}]" if ":" in self.web_host else self.web_host
        return f"{host}:{self.web_port}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag's help names its environment variable and default."""
    p = _Parser(
        prog="esper-telemetryd",
        description="Receive esper-telemetry events over ZeroMQ and export them to Prometheus.",
    )

    def add(flag: str, env: str, default: object, help: str, **kw: object) -> None:
        p.add_argument(flag, default=None, help=f"{help} (env {env}; default {default})", **kw)

    add("--zmq.listen-address", d.ENV_ZMQ_LISTEN_ADDRESS, d.DEFAULT_ZMQ_LISTEN_ADDRESS,
        "ZeroMQ endpoint to bind a PULL socket on, tcp://HOST:PORT or ipc://PATH; repeatable "
        "(the environment variable takes a comma-separated list)",
        action="append", dest="zmq_listen_address", metavar="ENDPOINT")
    add("--web.listen-address", d.ENV_WEB_LISTEN_ADDRESS, d.DEFAULT_WEB_LISTEN_ADDRESS,
        "HOST:PORT for /metrics and /-/healthy, /-/ready; ':PORT' means all interfaces",
        dest="web_listen_address", metavar="ADDRESS")
    add("--web.telemetry-path", d.ENV_WEB_TELEMETRY_PATH, d.DEFAULT_WEB_TELEMETRY_PATH,
        "path under which to expose metrics", dest="telemetry_path", metavar="PATH")
    add("--run.ttl-seconds", d.ENV_RUN_TTL_SECONDS, d.DEFAULT_RUN_TTL_SECONDS,
        "a run with no event for this long is dropped", dest="run_ttl", metavar="SECONDS")
    add("--limits.max-runs", d.ENV_MAX_RUNS, d.DEFAULT_MAX_RUNS,
        "most runs held at once; events of further runs are dropped and counted",
        dest="max_runs", metavar="N")
    add("--limits.max-groups-per-run", d.ENV_MAX_GROUPS_PER_RUN, d.DEFAULT_MAX_GROUPS_PER_RUN,
        "most parameter groups held per run; further groups are dropped and counted",
        dest="max_groups", metavar="N")
    add("--limits.max-ranks-per-run", d.ENV_MAX_RANKS_PER_RUN, d.DEFAULT_MAX_RANKS_PER_RUN,
        "most ranks (collectors) held per run; events of further ranks are dropped and "
        "counted", dest="max_ranks", metavar="N")
    add("--queue.size", d.ENV_QUEUE_SIZE, d.DEFAULT_QUEUE_SIZE,
        "receiver-to-aggregator queue capacity in events; a message that does not fit is "
        "dropped and counted", dest="queue_size", metavar="EVENTS")
    add("--shard.window-seconds", d.ENV_SHARD_WINDOW_SECONDS, d.DEFAULT_SHARD_WINDOW_SECONDS,
        "how long to wait for every rank's shard of a step before counting it incomplete",
        dest="shard_window", metavar="SECONDS")
    add("--shutdown.timeout-seconds", d.ENV_SHUTDOWN_TIMEOUT_SECONDS,
        d.DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
        "on SIGTERM/SIGINT, the deadline to drain the queue", dest="shutdown_timeout",
        metavar="SECONDS")
    add("--shutdown.linger-seconds", d.ENV_SHUTDOWN_LINGER_SECONDS,
        d.DEFAULT_SHUTDOWN_LINGER_SECONDS,
        "after draining, keep answering scrapes this long (ended by the first scrape)",
        dest="shutdown_linger", metavar="SECONDS")
    add("--log.level", d.ENV_LOG_LEVEL, d.DEFAULT_LOG_LEVEL,
        f"one of {', '.join(LOG_LEVELS)}", dest="log_level", metavar="LEVEL")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration and exit (0 if valid)")
    p.add_argument("--version", action="version", version=f"esper-telemetryd {__version__}")
    return p


def parse_args(
    argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None
) -> Config:
    """Flags, then environment, then defaults, validated; raises ``ConfigError``."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(argv)

    def pick(flag_value: Optional[str], name: str, default: object) -> str:
        if flag_value is not None:
            return flag_value
        value = env.get(name, "")
        return value if value else str(default)

    if ns.zmq_listen_address:
        zmq_addrs = list(ns.zmq_listen_address)
    else:
        raw = env.get(d.ENV_ZMQ_LISTEN_ADDRESS, "") or d.DEFAULT_ZMQ_LISTEN_ADDRESS
        zmq_addrs = [a.strip() for a in raw.split(",") if a.strip()]
    if not zmq_addrs:
        raise ConfigError("--zmq.listen-address: at least one endpoint is required")
    for addr in zmq_addrs:
        _check_zmq_endpoint(addr)
    if len(set(zmq_addrs)) != len(zmq_addrs):
        raise ConfigError("--zmq.listen-address: the same endpoint is given twice")

    host, port = _parse_web_address(
        pick(ns.web_listen_address, d.ENV_WEB_LISTEN_ADDRESS, d.DEFAULT_WEB_LISTEN_ADDRESS))
    path = pick(ns.telemetry_path, d.ENV_WEB_TELEMETRY_PATH, d.DEFAULT_WEB_TELEMETRY_PATH)
    if not path.startswith("/") or path in ("/", "/-/healthy", "/-/ready") or " " in path:
        raise ConfigError(f"--web.telemetry-path: {path!r} must be a path like /metrics")

    level = pick(ns.log_level, d.ENV_LOG_LEVEL, d.DEFAULT_LOG_LEVEL).lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log.level: {level!r} is not one of {', '.join(LOG_LEVELS)}")

    return Config(
        zmq_listen_addresses=tuple(zmq_addrs),
        web_host=host,
        web_port=port,
        telemetry_path=path,
        run_ttl_s=_number("--run.ttl-seconds",
                          pick(ns.run_ttl, d.ENV_RUN_TTL_SECONDS, d.DEFAULT_RUN_TTL_SECONDS),
                          minimum=0.001),
        max_runs=_integer("--limits.max-runs",
                          pick(ns.max_runs, d.ENV_MAX_RUNS, d.DEFAULT_MAX_RUNS)),
        max_groups_per_run=_integer(
            "--limits.max-groups-per-run",
            pick(ns.max_groups, d.ENV_MAX_GROUPS_PER_RUN, d.DEFAULT_MAX_GROUPS_PER_RUN)),
        max_ranks_per_run=_integer(
            "--limits.max-ranks-per-run",
            pick(ns.max_ranks, d.ENV_MAX_RANKS_PER_RUN, d.DEFAULT_MAX_RANKS_PER_RUN)),
        queue_size=_integer("--queue.size",
                            pick(ns.queue_size, d.ENV_QUEUE_SIZE, d.DEFAULT_QUEUE_SIZE)),
        shard_window_s=_number(
            "--shard.window-seconds",
            pick(ns.shard_window, d.ENV_SHARD_WINDOW_SECONDS, d.DEFAULT_SHARD_WINDOW_SECONDS),
            minimum=0.001),
        shutdown_timeout_s=_number(
            "--shutdown.timeout-seconds",
            pick(ns.shutdown_timeout, d.ENV_SHUTDOWN_TIMEOUT_SECONDS,
                 d.DEFAULT_SHUTDOWN_TIMEOUT_SECONDS), minimum=0.0),
        shutdown_linger_s=_number(
            "--shutdown.linger-seconds",
            pick(ns.shutdown_linger, d.ENV_SHUTDOWN_LINGER_SECONDS,
                 d.DEFAULT_SHUTDOWN_LINGER_SECONDS), minimum=0.0),
        log_level=level,
        check_config=bool(ns.check_config),
    )


def _number(flag: str, raw: str, minimum: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{flag}: {raw!r} is not a number") from None
    if not (value >= minimum) or value == float("inf"):
        raise ConfigError(f"{flag}: {raw!r} must be a finite number >= {minimum:g}")
    return value


def _integer(flag: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{flag}: {raw!r} is not an integer") from None
    if value < 1:
        raise ConfigError(f"{flag}: {raw!r} must be at least 1")
    return value


_TCP = re.compile(r"^tcp://(?P<host>\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\*|\d+)$")


def _check_zmq_endpoint(addr: str) -> None:
    if addr.startswith("ipc://"):
        if len(addr) <= len("ipc://"):
            raise ConfigError(f"--zmq.listen-address: {addr!r} has no path")
        return
    m = _TCP.match(addr)
    if m is None:
        raise ConfigError(
            f"--zmq.listen-address: {addr!r} is not tcp://HOST:PORT or ipc://PATH")
    if m["port"] != "*" and not 0 <= int(m["port"]) <= 65535:
        raise ConfigError(f"--zmq.listen-address: port out of range in {addr!r}")


def _parse_web_address(raw: str) -> Tuple[str, int]:
    host, sep, port_s = raw.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"--web.listen-address: {raw!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--web.listen-address: bad IPv6 address in {raw!r}") from None
    elif ":" in host:
        raise ConfigError(f"--web.listen-address: write IPv6 addresses as [ADDR]:PORT, not {raw!r}")
    # An empty host means every interface, as in Prometheus exporters' ':9100'.
    return host, int(port_s)
