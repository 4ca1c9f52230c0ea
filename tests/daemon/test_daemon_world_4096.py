"""A 4,096-rank job served exactly by a real ``esper-telemetryd`` (issue 20, item 6).

Every rank of the job holds a shard of two sharded groups (without fingerprints, and with
them as schema 3 collectors send them: each rank its own) and sends its ``Hello`` and then
its steps in one message (a collector that reconnects, or one whose daemon restarted,
flushes up to 256 steps at once), over eight loopback sockets the daemon fair-queues
between, as the ranks of a job spread over hosts would. Every step then opens on the
first rank's message and completes only once every rank's message has been read: every
step of every rank waits at once, while the daemon reads 4,096 messages. Before, the
daemon gave up all but the last 64 steps (a cap on waiting steps below the collector's
batch) and, past 30 s of reading, steps whose parts were still arriving.

The figures read: every step
complete (the daemon's count of given-up steps 0), each
group's norm at the last step equal to the float64 sum over ranks, and the daemon's RSS
from /proc under the 512 MiB every flood test holds it to.

The last test gives each rank a connection of its own (4,096 real TCP peers of one PULL
socket, as a job's collectors are), a message a step, 100 steps each sent as fast as they
go (as collectors flush their queues to a restarted daemon): every step exact, no
connection dropped by the memory guard, RSS under 512 MiB. Before the receiver's backlog
libzmq held those messages at about 8 KiB each: 1.37 GiB, and the guard dropped every
connection.
"""

from __future__ import annotations

import math
import resource
import time

import pytest
import zmq
from daemon_support import get
from live_daemon import LiveDaemon, PeakRss, push_socket

from esper_telemetry import GroupDecl, GroupNorm, Hello, Norms, encode
from esper_telemetry.daemon import layout, shards

pytestmark = pytest.mark.slow

RANKS = 4096
SOCKETS = 8
GROUPS = ("blocks", "head")
RUN = "world-4096"


def _sq(rank: int, group: int, step: int) -> float:
    """Rank ``rank``'s shard of ``group`` at ``step``: varied, and not exactly summable in
    any order (the reference sums in float64 with ``math.fsum``)."""
    return (1.0 + (rank % 13) * 0.1 + group) * (1.0 + step / 1000.0) / 3.0


def _fingerprint(rank: int, group: int) -> int | None:
    return 1 + rank * len(GROUPS) + group  # FSDP: every rank holds a shard of its own


def _message(rank: int, steps: int, fingerprinted: bool) -> bytes:
    """A rank's ``Hello`` and its ``steps`` captures, as one message."""
    fp = _fingerprint if fingerprinted else lambda rank, group: None
    decls = tuple(
        GroupDecl(name, "group", 1000, False, fp(rank, g)) for g, name in enumerate(GROUPS)
    )
    hello = Hello(RUN, rank, 1.0, RANKS, "host", 1, "v", "t", decls if fingerprinted else ())
    norms = [
        Norms(
            RUN,
            rank,
            1.0,
            step,
            False,
            tuple(
                GroupNorm(name, "group", 1000, _sq(rank, g, step), 0, True, False, fp(rank, g))
                for g, name in enumerate(GROUPS)
            ),
            RANKS,
        )
        for step in range(steps)
    ]
    return encode([hello, *norms], seq=0)


@pytest.mark.parametrize(
    "fingerprinted, steps",
    [
        # Sharded groups without fingerprints (shards.py): more than the 64 steps that used
        # to wait at most.
        (False, 100),
        # Fingerprinted ones, as schema 3 collectors send them (layout.py).
        (True, 100),
    ],
)
def test_a_4096_rank_job_sending_its_steps_in_one_message_each_is_served_exactly(
    tmp_path, fingerprinted, steps
):
    assert steps <= (layout if fingerprinted else shards).MAX_PENDING_STEPS
    d = LiveDaemon(tmp_path / "d.log")
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 64)
    try:
        with PeakRss(d, interval_s=0.05) as rss:
            socks = [push_socket(ctx, d.endpoint, linger_ms=60_000) for _ in range(SOCKETS)]
            start = time.monotonic()
            for rank in range(RANKS):
                socks[rank % SOCKETS].send(_message(rank, steps, fingerprinted))
            s = _all_applied(d, RANKS * (steps + 1))
            took = time.monotonic() - start
            for sock in socks:
                sock.close()
    finally:
        code = d.stop()
        ctx.term()
    assert code == 0, d.log()
    print(
        f"\n{RANKS} ranks x {steps} steps of {len(GROUPS)} sharded groups "
        f"(fingerprinted: {fingerprinted}) in {took:.1f} s; "
        f"RSS {rss.base / 2**20:.0f} -> peak {rss.peak / 2**20:.0f} MiB"
    )
    assert (get(s, "esper_daemon_incomplete_steps_total", run=RUN) or 0) == 0
    assert (get(s, "esper_daemon_dropped_shard_reports_total", run=RUN) or 0) == 0
    last = steps - 1
    _assert_last_step_exact(s, steps)
    # Every step counted, and the model norm of the last one.
    assert get(s, "esper_model_steps_total", run=RUN) == steps
    model = math.sqrt(
        math.fsum(_sq(rank, g, last) for rank in range(RANKS) for g in range(len(GROUPS)))
    )
    assert get(s, "esper_model_grad_norm", run=RUN) == pytest.approx(model, rel=1e-12)
    assert rss.peak < 512 << 20, f"peak RSS {rss.peak / 2**20:.0f} MiB"


CONNECTED_STEPS = 100


def test_4096_collectors_each_on_its_own_connection_are_served_exactly(tmp_path):
    # What libzmq holds grows with the peers: about 24 KiB a connection, and about 8.5 KiB
    # a small message queued in a pipe while the daemon is behind.
    _raise_open_files(2 * RANKS + 256)  # a socket's connection and its mailbox, here
    d = LiveDaemon(tmp_path / "d.log")
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, RANKS + 64)
    socks: list[zmq.Socket] = []
    try:
        with PeakRss(d, interval_s=0.05) as rss:
            socks = [push_socket(ctx, d.endpoint, linger_ms=60_000) for _ in range(RANKS)]
            start = time.monotonic()
            for rank, sock in enumerate(socks):
                sock.send(_message(rank, 0, fingerprinted=False), copy=False)
            for step in range(CONNECTED_STEPS):
                for rank, sock in enumerate(socks):
                    sock.send(_step(rank, step), copy=False)
            s = _all_applied(d, RANKS * (CONNECTED_STEPS + 1))
            took = time.monotonic() - start
            connected = d.open_fds()
    finally:
        for sock in socks:
            sock.close()
        code = d.stop()
        ctx.term()
    assert code == 0, d.log()
    print(
        f"\n{RANKS} collectors on {RANKS} connections x {CONNECTED_STEPS} steps in {took:.1f} s "
        f"({connected} descriptors open); RSS {rss.base / 2**20:.0f} -> peak "
        f"{rss.peak / 2**20:.0f} MiB"
    )
    assert connected > RANKS  # each collector its own connection (and the daemon's own)
    assert (get(s, "esper_daemon_memory_sheds_total", what="connection") or 0) == 0
    assert (get(s, "esper_daemon_memory_sheds_total", what="all") or 0) == 0
    assert (get(s, "esper_daemon_incomplete_steps_total", run=RUN) or 0) == 0
    assert get(s, "esper_model_steps_total", run=RUN) == CONNECTED_STEPS
    _assert_last_step_exact(s, CONNECTED_STEPS)
    assert rss.peak < 512 << 20, f"peak RSS {rss.peak / 2**20:.0f} MiB"


def _all_applied(d: LiveDaemon, sent: int):
    """The daemon's scrape once it has applied ``sent`` events."""
    return d.scrape_until(
        lambda s: get(s, "esper_daemon_events_total") == sent,
        f"all {sent} events applied",
        timeout_s=300.0,
        interval_s=1.0,
    )


def _assert_last_step_exact(s, steps: int) -> None:
    """Each group's norm at the last of ``steps`` is the float64 sum over every rank."""
    last = steps - 1
    for g, name in enumerate(GROUPS):
        want = math.sqrt(math.fsum(_sq(rank, g, last) for rank in range(RANKS)))
        got = get(s, "esper_grad_norm", run=RUN, group=name)
        assert got == pytest.approx(want, rel=1e-12), (name, got, want)


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"{needed} open files needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _step(rank: int, step: int) -> bytes:
    """Rank ``rank``'s capture of ``step`` alone, as a collector sends one a step."""
    groups = tuple(
        GroupNorm(name, "group", 1000, _sq(rank, g, step), 0, True, False, None)
        for g, name in enumerate(GROUPS)
    )
    return encode([Norms(RUN, rank, 1.0, step, False, groups, RANKS)], seq=step + 1)
