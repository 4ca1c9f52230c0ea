"""The daemon's configuration: every setting declared once, as a field of ``Config``.

Each field is one row (``settings.setting``): flag (its ``ESPER_*`` variable is named
after it), default, unit, parser with its bounds, and help; nowhere else is a daemon
setting or its default written. The command line, the resolution (the flag, then the
variable, then the default), ``--check-config``, the README's flags table and the deploy
files' tests are derived from these rows. From the contract (``esper_telemetry.defaults``)
come only what the collector shares: the endpoints and the size of its messages. Invalid
configuration is the one fatal input (a ``ConfigError`` with a one-line reason naming the
flag or the variable); bad events never are.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from esper_telemetry.defaults import (
    COLLECTOR_MESSAGE_BYTES,
    DEFAULT_ENDPOINT,
    DEFAULT_WEB_PORT,
    DEFAULT_WEB_TELEMETRY_PATH,
    MAX_MESSAGE_BYTES,
)
from esper_telemetry.endpoints import check_endpoint
from esper_telemetry.version import __version__

from .settings import (
    ConfigError,
    Setting,
    Switch,
    integer,
    number,
    one_of,
    resolve,
    rows_of,
    setting,
)
from .settings import build_parser as _build_parser
from .settings import flags_table as _flags_table

__all__ = [
    "Config",
    "ConfigError",
    "WebAddress",
    "SETTINGS",
    "SWITCHES",
    "LOG_LEVELS",
    "parse_args",
    "build_parser",
    "flags_table",
]

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")


class WebAddress(NamedTuple):
    """Where the HTTP server listens; an empty host means every interface."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def zmq_endpoints(addresses: Sequence[str]) -> tuple[str, ...]:
    """At least one endpoint, each ``tcp://HOST:PORT`` or ``ipc://PATH``, none twice."""
    if not addresses:
        raise ValueError("at least one endpoint is required")
    for addr in addresses:
        check_endpoint(addr, bind=True)
    if len(set(addresses)) != len(addresses):
        raise ValueError("the same endpoint is given twice")
    return tuple(addresses)


def web_address(raw: str) -> WebAddress:
    """``HOST:PORT``, ``[IPv6]:PORT``, or ``:PORT`` for every interface."""
    host, sep, port_s = raw.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{raw!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address in {raw!r}") from None
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses as [ADDR]:PORT, not {raw!r}")
    # An empty host means every interface, as in Prometheus exporters' ':9100'.
    return WebAddress(host, int(port_s))


def telemetry_path(raw: str) -> str:
    """An absolute path that is not one of the server's own."""
    if not raw.startswith("/") or raw in ("/", "/-/healthy", "/-/ready") or " " in raw:
        raise ValueError(f"{raw!r} must be a path like /metrics")
    return raw


_counts = integer(minimum=1)


def message_bytes(raw: str) -> int:
    """A message size limit: 1 KiB up to the wire's own limit (larger could never decode)."""
    value = integer(minimum=1024)(raw)
    if value > MAX_MESSAGE_BYTES:
        raise ValueError(f"{raw!r} must be at most {MAX_MESSAGE_BYTES} (the wire's limit)")
    return value


def _readable_by(module: str, reader: str) -> Callable[[str], str]:
    """A path setting, empty (off) or one that ``module.reader`` reads without a ValueError
    (the reason names what is wrong); imported only when the setting is used."""

    def parse(raw: str) -> str:
        if raw:
            getattr(importlib.import_module(module, __package__), reader)(raw)
        return raw

    return parse


# A .key_secret certificate holding a key pair; a directory of *.key certificates; an
# exporter-toolkit web configuration (WebConfigError is a ValueError naming the field).
curve_secret_key_file = _readable_by(".curve", "read_server_keys")
curve_authorized_keys_dir = _readable_by(".curve", "read_public_keys")
web_config_file = _readable_by(".webconfig", "load_web_config")


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings; durations in seconds, sizes in events, counts as given."""

    zmq_listen_addresses: tuple[str, ...] = setting(
        "--zmq.listen-address",
        DEFAULT_ENDPOINT,
        zmq_endpoints,
        metavar="ENDPOINT",
        repeatable=True,
        help="endpoint to bind a PULL socket on: `tcp://HOST:PORT` (`*` for any host or a "
        "random port; IPv6 as `tcp://[::1]:PORT`) or `ipc://PATH`; repeatable",
    )
    web_listen_address: WebAddress = setting(
        "--web.listen-address",
        f"127.0.0.1:{DEFAULT_WEB_PORT}",
        web_address,
        metavar="ADDRESS",
        help="`HOST:PORT` of the HTTP server; `:PORT` means every interface, `[::1]:PORT` for IPv6",
    )
    # Twice the largest batch a collector sends (it splits larger ones).
    zmq_max_message_bytes: int = setting(
        "--zmq.max-message-bytes",
        2 * COLLECTOR_MESSAGE_BYTES,
        message_bytes,
        metavar="BYTES",
        unit="bytes",
        help="larger frames are refused by libzmq before they are read (`ZMQ_MAXMSGSIZE`; "
        "it drops that sender's connection: the loss shows in `esper_messages_lost_total`); "
        f"at most the wire's limit ({MAX_MESSAGE_BYTES}); collectors split their batches at "
        "half the default",
    )
    # 128 messages of 256 KiB: a flood of max-size frames holds at most this much per sender.
    # Measured (bench/daemon_ingest.py, saturated): libzmq sometimes resumes a full pipe
    # slowly (a trial at 10,000-15,000 events/s instead of about 180,000): 4 of 10 batched
    # trials at a mark of 32 messages (1 MiB frames), 1 of 10 at 128.
    zmq_receive_buffer_bytes: int = setting(
        "--zmq.receive-buffer-bytes",
        32 << 20,
        _counts,
        metavar="BYTES",
        unit="bytes",
        help="what libzmq may buffer per connected collector: the receive high-water mark is "
        "this over `--zmq.max-message-bytes`, in messages (at least 1); beyond it the "
        "collector's sends fail and it counts them as dropped",
    )
    zmq_curve_secret_key_file: str = setting(
        "--zmq.curve.secret-key-file",
        "",
        curve_secret_key_file,
        metavar="FILE",
        help="the daemon's ZeroMQ certificate with its secret key (`esper-telemetry keygen DIR "
        "NAME` writes `NAME.key_secret`): every ingest socket then takes only CURVE "
        "clients that know the daemon's public key (`NAME.key`); empty: plain ZeroMQ, "
        "unauthenticated (said once at startup)",
    )
    zmq_curve_authorized_keys_dir: str = setting(
        "--zmq.curve.authorized-keys-dir",
        "",
        curve_authorized_keys_dir,
        metavar="DIR",
        help="with CURVE on, admit only collectors whose public certificate (`*.key`) is in "
        "this directory, re-read on SIGHUP and when it changes; empty: any CURVE client",
    )
    web_config_file: str = setting(
        "--web.config.file",
        "",
        web_config_file,
        metavar="FILE",
        help="TLS and basic authentication for the HTTP side, in the Prometheus exporter "
        "toolkit's web configuration format (`tls_server_config`, `basic_auth_users`); "
        "`/-/healthy` and `/-/ready` stay open; empty: plain HTTP",
    )
    telemetry_path: str = setting(
        "--web.telemetry-path",
        DEFAULT_WEB_TELEMETRY_PATH,
        telemetry_path,
        metavar="PATH",
        help="path of the exposition",
    )
    web_write_timeout_s: float = setting(
        "--web.write-timeout-seconds",
        10.0,
        number(minimum=0.001),
        metavar="SECONDS",
        unit="seconds",
        help="a response the client has not read whole by then is abandoned and its "
        "connection closed (a non-reading client holds memory at most this long)",
    )
    web_max_connections: int = setting(
        "--web.max-connections",
        64,
        _counts,
        metavar="N",
        unit="connections",
        help="HTTP requests served at once; past it a keep-alive connection between requests "
        "gives its slot up, else the request gets a 503 (health checks are answered "
        "whatever the load; connections still sending headers wait apart, 5 s at most)",
    )
    # 50,000 series render in about 40 ms on the 2-core reference box and make about 3 MB of
    # text with typical names (about 27 MB at the wire's 256-character name limit), so the
    # render threads and the bodies in flight (at most web.MAX_BODY_BYTES) stay well under
    # the daemon's 512 MiB RSS target (318 MiB peak measured with long names and 24 clients
    # that never read); the default run and group caps alone allow about 130,000 series
    # with long names (70 MB). See docs/daemon.md.
    web_max_series: int = setting(
        "--web.max-series",
        50_000,
        integer(minimum=100),
        metavar="N",
        unit="series",
        help="series one scrape carries at most, the daemon's own included: past it, whole "
        "runs are left out (live runs with norms kept first, then the runs held longest) "
        "and counted in `esper_daemon_scrape_omitted_series` and "
        "`esper_daemon_scrapes_truncated_total`; the daemon's own series are always "
        "written",
    )
    # Collectors heartbeat every few seconds: only a dead or disconnected job goes this quiet.
    run_ttl_s: float = setting(
        "--run.ttl-seconds",
        300.0,
        number(minimum=0.001),
        metavar="SECONDS",
        unit="seconds",
        help="a run with no event for this long is dropped (and a rank no longer counts as "
        "a collector)",
    )
    run_ended_retention_s: float = setting(
        "--run.ended-retention-seconds",
        300.0,
        number(minimum=0.0),
        metavar="SECONDS",
        unit="seconds",
        help="a run whose every rank said goodbye stays exported this long, as it ended "
        "(`esper_run_ended` 1), so its final values reach a scrape; 0 drops it at once",
    )
    # Twelve of the collector's 5 s heartbeats.
    run_evict_after_s: float = setting(
        "--run.evict-after-seconds",
        60.0,
        number(minimum=0.0),
        metavar="SECONDS",
        unit="seconds",
        help="with the run table full, a new run takes the place of an ended run, else of "
        "the longest-idle run that never sent norms, else of the longest-idle run "
        "idle this long; 0: of the longest-idle run",
    )
    # Four scrapes at Prometheus's usual 15 s: every step's norm lies in a band some scrape
    # reads (daemon/steps.py keeps the window in six buckets).
    window_s: float = setting(
        "--window.seconds",
        60.0,
        number(minimum=1.0),
        metavar="SECONDS",
        unit="seconds",
        help="the trailing window of `esper_grad_norm_max` and `esper_grad_norm_min`: the "
        "extremes of every capture received in it (and at most a sixth more), so a "
        "one-step spike is in the band of every scrape for this long",
    )
    # bench/spike_rule.py: healthy runs reached 3.4x their median at worst; 10x leaves a
    # margin of three, and a 20x step still counts.
    spike_factor: float = setting(
        "--spike.factor",
        10.0,
        number(minimum=1.5),
        metavar="X",
        unit="ratio",
        help="a capture whose norm exceeds this many times the median of the group's "
        "previous 32 finite norms (judged after 8) counts in `esper_grad_norm_spikes_total`",
    )
    max_runs: int = setting(
        "--limits.max-runs",
        100,
        _counts,
        metavar="N",
        unit="runs",
        help="runs held at once (ended runs kept included); a new run beyond it takes an "
        "idle run's place (`--run.evict-after-seconds`), or its events are dropped and "
        "counted",
    )
    max_groups_per_run: int = setting(
        "--limits.max-groups-per-run",
        128,
        _counts,
        metavar="N",
        unit="groups",
        help="groups held per run; further groups are dropped and counted",
    )
    max_ranks_per_run: int = setting(
        "--limits.max-ranks-per-run",
        4096,
        _counts,
        metavar="N",
        unit="ranks",
        help="ranks held per run; events of further ranks are dropped and counted",
    )
    # What libzmq holds of a multipart message still arriving has no bound of its own (one
    # peer took the daemon to 1.5 GiB in 1.6 s): past this RSS the busiest collector
    # connection is dropped, then every one (daemon/memory.py). 768 MiB leaves room for the
    # 0.1 s a drop takes at the fastest stream measured (about 1 GB/s) under 1 GiB.
    memory_limit_bytes: int = setting(
        "--limits.memory-bytes",
        768 << 20,
        integer(minimum=64 << 20),
        metavar="BYTES",
        unit="bytes",
        help="resident memory past which the daemon drops the collector connection that "
        "received the most (then, if still past it, every one; collectors reconnect) and "
        "counts it in `esper_daemon_memory_sheds_total`: a bound on what libzmq buffers for "
        "a multipart message that never ends",
    )
    queue_size: int = setting(
        "--queue.size",
        65536,
        _counts,
        metavar="EVENTS",
        unit="events",
        help="receiver-to-aggregator queue capacity, in events",
    )
    shard_window_s: float = setting(
        "--shard.window-seconds",
        30.0,
        number(minimum=0.001),
        metavar="SECONDS",
        unit="seconds",
        help="how long a sharded step waits for its next rank's report before it is given "
        "up (from its latest report: a backlog being read does not expire it)",
    )
    shutdown_timeout_s: float = setting(
        "--shutdown.timeout-seconds",
        10.0,
        number(minimum=0.0),
        metavar="SECONDS",
        unit="seconds",
        help="on SIGTERM/SIGINT, the deadline to drain the queue",
    )
    shutdown_linger_s: float = setting(
        "--shutdown.linger-seconds",
        0.0,
        number(minimum=0.0),
        metavar="SECONDS",
        unit="seconds",
        help="after draining, keep answering scrapes this long; the first scrape ends it early",
    )
    log_level: str = setting(
        "--log.level",
        "info",
        one_of(LOG_LEVELS, aliases={"warning": "warn"}),
        metavar="LEVEL",
        help="`debug`, `info`, `warn` or `error`",
    )
    log_format: str = setting(
        "--log.format",
        "logfmt",
        one_of(LOG_FORMATS),
        metavar="FORMAT",
        help="`logfmt` or `json`, one record per line; at most 100 lines a minute (5 of a kind), "
        "the rest counted in summary lines",
    )
    check_config: bool = False  # --check-config: validate, then exit


SETTINGS: tuple[Setting, ...] = rows_of(Config)

SWITCHES: tuple[Switch, ...] = (
    Switch(
        "--check-config",
        "validate the configuration and exit",
        {"action": "store_true", "dest": "check_config"},
    ),
    Switch(
        "--version",
        "print the version and exit",
        {"action": "version", "version": f"esper-telemetryd {__version__}"},
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line, from ``SETTINGS`` and ``SWITCHES``."""
    return _build_parser(
        SETTINGS,
        SWITCHES,
        prog="esper-telemetryd",
        description="Receive esper-telemetry events over ZeroMQ and export them to Prometheus.",
    )


def flags_table() -> str:
    """The README's "Daemon flags" table, from ``SETTINGS`` and ``SWITCHES``."""
    return _flags_table(SETTINGS, SWITCHES)


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Flags, then environment (default ``os.environ``), then defaults, validated.

    Raises ``ConfigError`` with one line naming the flag, or the variable when the bad
    value came from the environment.
    """
    ns = vars(build_parser().parse_args(argv))
    values = resolve(SETTINGS, ns, os.environ if environ is None else environ)
    if values["zmq_curve_authorized_keys_dir"] and not values["zmq_curve_secret_key_file"]:
        raise ConfigError(
            "--zmq.curve.authorized-keys-dir needs --zmq.curve.secret-key-file: "
            "without the daemon's own key there is no CURVE to authorize"
        )
    return Config(**values, check_config=bool(ns["check_config"]))
