"""Sharded steps and the world size (issue 20, items 1 and 2): against real daemon
processes on loopback, a daemon restarted mid-step never publishes a partial sum, ranks
outside the world and absurd world sizes are refused and counted (figures from /metrics);
the fast decoder takes schema 3 captures with their world, and schema 2 ones, exactly as
the codec does."""

from __future__ import annotations

import logging
import math
import random
import signal
import time

import msgpack
import pytest
import zmq
from daemon_support import get, make_limits
from live_daemon import LiveDaemon

from esper_telemetry import GroupDecl, GroupNorm, Hello, Norms, decode, encode
from esper_telemetry.daemon.aggregator import Aggregator
from esper_telemetry.daemon.fastdecode import NormsV2, NormsV3, decode_norms
from esper_telemetry.daemon.stats import DaemonStats

WORLD = 10
WINDOW_S = 1.0


def shard(run: str, rank: int, step: int, world: int | None, sq: float = 1.0) -> Norms:
    """One rank's capture of a sharded group ``w`` (its sum of squares ``sq``)."""
    return Norms(
        run, rank, 1.0, step, False, (GroupNorm("w", "group", 10, sq, 0, True, False),), world
    )


def hello(run: str, rank: int, world: int) -> Hello:
    return Hello(run, rank, 1.0, world, "h", 1, "0", "", (GroupDecl("w", "group", 10, False),))


def schema_2(event: Norms, seq: int) -> bytes:
    """``event`` as a collector of the previous release sends it: schema 2, no world and no
    group fingerprints."""
    wire = msgpack.unpackb(encode(event, seq=seq))
    del wire["world"]
    wire["groups"] = [g[:7] for g in wire["groups"]]  # nor fingerprints
    wire["v"] = 2
    return msgpack.packb(wire)


class Ranks:
    """One PUSH socket per rank, numbering its messages like a collector."""

    def __init__(self, ctx: zmq.Context, endpoint: str, world: int) -> None:
        self.socks = []
        for _ in range(world):
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.connect(endpoint)
            self.socks.append(sock)
        self.seq = [0] * world

    def send(self, rank: int, frame_of) -> None:
        self.socks[rank].send(frame_of(self.seq[rank]), zmq.NOBLOCK)
        self.seq[rank] += 1

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)


def applied(d: LiveDaemon, n: int, what: str):
    return d.scrape_until(lambda s: get(s, "esper_daemon_events_total") == n, what)


@pytest.mark.slow
def test_a_daemon_restarted_mid_step_publishes_no_partial_sum(tmp_path):
    # The job's Hellos went to the first daemon; its ranks reconnect to the second by
    # themselves and send no Hello. Before, the second expected "highest rank heard + 1"
    # ranks: it published step 10 from rank 0 alone (1.0) and step 11 from ranks 0 and 1
    # (1.414), where every step's norm is sqrt(10) = 3.162.
    first = LiveDaemon(tmp_path / "first.log", f"--shard.window-seconds={WINDOW_S * 30}")
    endpoint = first.endpoints[0]
    ctx = zmq.Context()
    ranks = Ranks(ctx, endpoint, WORLD)
    second = None
    try:
        for rank in range(WORLD):
            ranks.send(rank, lambda seq, r=rank: encode(hello("job", r, WORLD), seq=seq))
            ranks.send(rank, lambda seq, r=rank: encode(shard("job", r, 9, WORLD), seq=seq))
        s = first.scrape_until(
            lambda s: get(s, "esper_group_last_step", run="job", group="w") == 9, "step 9"
        )
        assert get(s, "esper_grad_norm", run="job", group="w") == math.sqrt(WORLD)
        first.stop(sig=signal.SIGKILL)
        second = LiveDaemon(
            tmp_path / "second.log",
            f"--zmq.listen-address={endpoint}",
            f"--shard.window-seconds={WINDOW_S * 30}",
        )
        assert endpoint in second.endpoints
        # Let every rank's socket reconnect before it sends (a PUSH queues meanwhile).
        time.sleep(0.5)
        ranks.send(0, lambda seq: encode(shard("job", 0, 10, WORLD), seq=seq))
        for rank in (0, 1):
            ranks.send(rank, lambda seq, r=rank: encode(shard("job", r, 11, WORLD), seq=seq))
        s = applied(second, 3, "the first three reports after the restart")
        assert get(s, "esper_grad_norm", run="job", group="w") is None
        assert get(s, "esper_group_last_step", run="job", group="w") is None
        for rank in range(1, WORLD):
            ranks.send(rank, lambda seq, r=rank: encode(shard("job", r, 10, WORLD), seq=seq))
        s = applied(second, 3 + WORLD - 1, "step 10 from every rank")
        assert get(s, "esper_group_last_step", run="job", group="w") == 10
        assert get(s, "esper_grad_norm", run="job", group="w") == math.sqrt(WORLD)
        for rank in range(2, WORLD):
            ranks.send(rank, lambda seq, r=rank: encode(shard("job", r, 11, WORLD), seq=seq))
        s = applied(second, 2 * WORLD, "step 11 from every rank")
        assert get(s, "esper_group_last_step", run="job", group="w") == 11
        assert get(s, "esper_grad_norm", run="job", group="w") == math.sqrt(WORLD)
        assert get(s, "esper_daemon_incomplete_steps_total", run="job") == 0
        assert get(s, "esper_daemon_world_unknown_steps_total") == 0
        assert get(s, "esper_collectors", run="job") == WORLD
    finally:
        ranks.close()
        ctx.term()
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.log()


@pytest.mark.slow
def test_collectors_without_a_world_size_make_steps_wait_counted_never_guessed(tmp_path):
    # Collectors of the previous release (schema 2) carry no world size: after a restart
    # the daemon cannot know how many ranks a step needs. Their steps wait, are counted,
    # and are given up after the window; a Hello (a collector attaching) makes it known.
    d = LiveDaemon(tmp_path / "d.log", f"--shard.window-seconds={WINDOW_S}")
    ctx = zmq.Context()
    ranks = Ranks(ctx, d.endpoints[0], 3)
    try:
        for rank in (0, 1):
            ranks.send(rank, lambda seq, r=rank: schema_2(shard("old", r, 5, None), seq))
        s = d.scrape_until(
            lambda s: get(s, "esper_daemon_incomplete_steps_total", run="old") == 1,
            "step 5 given up after the window",
        )
        assert get(s, "esper_daemon_world_unknown_steps_total") == 1
        assert get(s, "esper_grad_norm", run="old", group="w") is None
        # Step 6 from ranks 0 and 1, then a Hello says the world is 2: it is complete.
        for rank in (0, 1):
            ranks.send(rank, lambda seq, r=rank: schema_2(shard("old", r, 6, None, 2.0), seq))
        applied(d, 4, "step 6 from ranks 0 and 1")
        ranks.send(1, lambda seq: encode(hello("old", 1, 2), seq=seq))
        s = d.scrape_until(
            lambda s: get(s, "esper_group_last_step", run="old", group="w") == 6, "step 6"
        )
        assert get(s, "esper_grad_norm", run="old", group="w") == 2.0
        assert get(s, "esper_daemon_world_unknown_steps_total") == 2
        assert get(s, "esper_daemon_incomplete_steps_total", run="old") == 1
    finally:
        ranks.close()
        ctx.term()
        assert d.stop() == 0, d.log()


@pytest.mark.slow
def test_ranks_outside_the_world_and_absurd_world_sizes_are_refused_and_counted(tmp_path):
    d = LiveDaemon(tmp_path / "d.log", "--limits.max-ranks-per-run=64")
    ctx = zmq.Context()
    ranks = Ranks(ctx, d.endpoints[0], 5)
    try:
        for rank in range(3):
            ranks.send(rank, lambda seq, r=rank: encode(hello("job", r, 3), seq=seq))
        applied(d, 3, "three Hellos")
        # Rank 3 of a world of 3: by the run's world (schema 2, no world of its own) and by
        # its own. Before, such a report completed step 1 with the wrong ranks.
        ranks.send(3, lambda seq: schema_2(shard("job", 3, 1, None, 5.0), seq))
        ranks.send(4, lambda seq: encode(shard("job", 4, 1, 3, 5.0), seq=seq))
        # A Hello claiming a million ranks would freeze the run's sharded norms; a capture
        # claiming more than --limits.max-ranks-per-run too.
        ranks.send(4, lambda seq: encode(hello("job", 4, 1_000_000), seq=seq))
        ranks.send(4, lambda seq: encode(shard("job", 4, 1, 65, 5.0), seq=seq))
        s = applied(d, 7, "the refused events")
        assert get(s, "esper_daemon_refused_events_total", reason="rank_outside_world") == 2
        assert get(s, "esper_daemon_refused_events_total", reason="world_too_large") == 2
        assert get(s, "esper_collectors", run="job") == 3
        for rank in range(3):
            ranks.send(rank, lambda seq, r=rank: encode(shard("job", r, 1, 3), seq=seq))
        s = d.scrape_until(
            lambda s: get(s, "esper_group_last_step", run="job", group="w") == 1, "step 1"
        )
        # The three ranks of the world, and nothing of the refused ones (5.0 each).
        assert get(s, "esper_grad_norm", run="job", group="w") == math.sqrt(3)
        assert get(s, "esper_daemon_dropped_shard_reports_total", run="job") == 0
    finally:
        ranks.close()
        ctx.term()
        assert d.stop() == 0, d.log()


# --- the fast decoder and the aggregator's fast path ----------------------------------

HEALTHY = Norms("r", 1, 2.5, 7, False, (GroupNorm("host", "host", 10, 4.0, 0, False, False),))


@pytest.mark.parametrize("world", [None, 1, 4096])
def test_schema_3_captures_take_the_fast_path_with_their_world(world):
    for message in (HEALTHY._replace(world=world), [HEALTHY._replace(world=world)] * 3):
        frame = encode(message, seq=5)
        fast = decode_norms(frame)
        assert fast is not None and all(type(e) is NormsV3 for e in fast)
        assert [e.world for e in fast] == [e.world for e in decode(frame)] == [world] * len(fast)


def test_schema_2_captures_take_the_fast_path_with_no_world():
    one = schema_2(HEALTHY, 5)
    batch = msgpack.packb([msgpack.unpackb(one)] * 3)
    for frame in (one, batch):
        fast = decode_norms(frame)
        assert fast is not None and all(type(e) is NormsV2 and e.world is None for e in fast)
        assert [e.world for e in decode(frame)] == [None] * len(fast)
    # A batch mixing schema 2 and 3 is refused by the codec; the fast path declines it.
    mixed = msgpack.packb([msgpack.unpackb(one), msgpack.unpackb(encode(HEALTHY, seq=5))])
    assert decode_norms(mixed) is None
    with pytest.raises(ValueError, match="version"):
        decode(mixed)


def test_a_message_whose_events_differ_in_world_is_left_to_the_codec():
    frame = encode([HEALTHY._replace(world=2), HEALTHY._replace(world=3)], seq=5)
    assert decode_norms(frame) is None
    assert [e.world for e in decode(frame)] == [2, 3]


def test_the_fast_path_and_records_reach_the_same_state_as_worlds_change():
    # Captures from ranks 0-3, their world now and then changed, absurd, or one rank's
    # outside it: the aggregator fed the fast decoder's structs ends where records lead.
    limits = make_limits(max_ranks_per_run=4, shard_window_s=1.0)
    fast_agg = Aggregator(limits, DaemonStats(), logging.getLogger("test.fast"))
    ref_agg = Aggregator(limits, DaemonStats(), logging.getLogger("test.ref"))
    rng = random.Random(20)
    world, fast_taken, now = 2, 0, 1000.0
    for seq in range(3000):
        if rng.random() < 0.02:
            world = rng.choice([1, 2, 3, 4, 5])  # 5: past the rank cap
        rank = rng.randrange(4)
        events = [
            HEALTHY._replace(
                run=rng.choice("ab"),
                rank=rank,
                step=seq,
                world=world if rng.random() < 0.97 else rng.choice([None, 3]),
                groups=(
                    GroupNorm("host", "host", 10, float(seq % 7), 0, False, False),
                    GroupNorm("w", "group", 10, 1.0, 0, rng.random() < 0.3, False),
                ),
            )
            for _ in range(rng.choice([1, 1, 3]))
        ]
        events = [e._replace(run=events[0].run) for e in events]
        frame = encode(events, seq=seq)
        fast = decode_norms(frame)
        fast_taken += fast is not None
        now += rng.choice([0.0, 0.1, 0.5])
        fast_agg.apply_batch(fast if fast is not None else decode(frame), now)
        ref_agg.apply_batch(decode(frame), now)
        if rng.random() < 0.1:
            fast_agg.tick(now)
            ref_agg.tick(now)
        assert repr(fast_agg.snapshot()) == repr(ref_agg.snapshot())
    snap = ref_agg.snapshot()
    assert fast_taken > 500
    assert snap.refused["rank_outside_world"] > 50 and snap.refused["world_too_large"] > 10
