"""Helpers for the daemon's tests: event builders, a fake clock, exposition parsing,
bounded waits. No torch."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from esper_telemetry import Goodbye, GroupDecl, GroupNorm, Heartbeat, Hello, Norms
from esper_telemetry.daemon.aggregator import Aggregator, Limits
from esper_telemetry.daemon.app import limits
from esper_telemetry.daemon.config import Config, WebAddress
from esper_telemetry.daemon.exporter import Exposition, process_registry
from esper_telemetry.daemon.textformat import EOF, OPENMETRICS, TEXT, render_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# (name, role, params, isolated)
DEFAULT_DECLS = (("host", "host", 400, False), ("seed", "seed", 100, True))


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def hello(
    run: str = "r",
    rank: int = 0,
    world_size: int = 1,
    decls: Sequence[tuple[str, str, int, bool]] = DEFAULT_DECLS,
) -> Hello:
    return Hello(
        run,
        rank,
        1.0,
        world_size,
        "host-a",
        1234,
        "0.1.0",
        "2.5.0",
        tuple(GroupDecl(*d) for d in decls),
    )


def gn(
    name: str,
    sq: float | None,
    role: str = "group",
    params: int = 10,
    nonfinite: int = 0,
    sharded: bool = False,
    isolated: bool = False,
) -> GroupNorm:
    return GroupNorm(name, role, params, sq, nonfinite, sharded, isolated)


def norms(
    run: str = "r",
    rank: int = 0,
    step: int = 1,
    groups: Iterable[GroupNorm] = (),
    time_: float = 1_700_000_000.0,
) -> Norms:
    return Norms(run, rank, time_, step, False, tuple(groups))


def host_seed(
    run: str = "r",
    rank: int = 0,
    step: int = 1,
    host_sq: float | None = 16.0,
    seed_sq: float | None = 4.0,
    sharded: bool = False,
    time_: float = 1_700_000_000.0,
) -> Norms:
    return norms(
        run,
        rank,
        step,
        (
            gn("host", host_sq, "host", 400, sharded=sharded),
            gn("seed", seed_sq, "seed", 100, sharded=sharded, isolated=True),
        ),
        time_,
    )


def heartbeat(run: str = "r", rank: int = 0, dropped: int = 0) -> Heartbeat:
    return Heartbeat(run, rank, 1.0, 10, dropped, 0, 0)


def goodbye(run: str = "r", rank: int = 0) -> Goodbye:
    return Goodbye(run, rank, 1.0, "closed")


def parse(text: str) -> Samples:
    """Every sample of an exposition: (sample name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one series, or None when it is absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """All series of one sample name, by labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str, dict[str, str]]:
    """Blocking GET (call via asyncio.to_thread from async tests)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` on the loop until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def make_config(**overrides: object) -> Config:
    """A daemon configuration on random loopback ports, with a short drain deadline."""
    base = Config(
        zmq_listen_addresses=("tcp://127.0.0.1:*",),
        web_listen_address=WebAddress("127.0.0.1", 0),
        shutdown_timeout_s=2.0,
    )
    return dataclasses.replace(base, **overrides)


def web_bounds(**overrides: object) -> dict[str, object]:
    """The ``WebServer``'s bounds as the daemon's defaults set them, but ``overrides``."""
    c = Config()
    return {
        "write_timeout_s": c.web_write_timeout_s,
        "max_connections": c.web_max_connections,
        **overrides,
    }


def make_limits(**overrides: object) -> Limits:
    """The aggregator's limits as the daemon's defaults make them, but ``overrides``."""
    return dataclasses.replace(limits(Config()), **overrides)


def exposition(
    agg: Aggregator,
    process_metrics: bool = False,
    queue: tuple[int, int] = (0, 65536),
    fmt: str = TEXT,
) -> str:
    """What a scrape of a daemon holding ``agg`` serves in ``fmt`` (the daemon's renderer,
    no series cap), with ``queue`` as (length, capacity)."""
    snap = agg.snapshot()._replace(queue_length=queue[0], queue_capacity=queue[1])
    process = process_registry() if process_metrics else None
    return Exposition(sys.maxsize, process).render(snap, fmt).decode()


def render(collector: Collector, fmt: str = TEXT) -> bytes:
    """Any collector's families through the daemon's encoder (``render_families``), in ``fmt``."""
    out = render_families(collector.collect(), fmt)
    if fmt == OPENMETRICS:
        out.append(EOF)
    return "".join(out).encode()


def inproc_receiver(ctx, name: str, queue, stats):
    """A bound ``Receiver`` on ``inproc://name`` with the default frame and buffer limits."""
    from esper_telemetry.daemon.receiver import Receiver

    receiver = Receiver(
        ctx,
        [f"inproc://{name}"],
        queue,
        stats,
        max_message_bytes=Config().zmq_max_message_bytes,
        receive_buffer_bytes=Config().zmq_receive_buffer_bytes,
    )
    receiver.bind()
    return receiver
