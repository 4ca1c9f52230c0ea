"""The daemon's fast ingest path gives exactly what the codec and the record path give.

``fastdecode.decode_norms`` and ``fastdecode.decode_columns`` may only answer for messages
``esper_telemetry.decode`` accepts, with the same values (anything else they leave to
``decode``, which gives the reason), and the aggregator must reach the same state from
their wire structs and columns as from ``decode``'s records. Both are checked
differentially: on hand-made edge cases, on bit flips of valid frames, on hypothesis-made
events, and on seeded random traffic through two aggregators.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections import Counter

import msgpack
import pytest
from daemon_support import get, make_limits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_telemetry import (
    Goodbye,
    GroupDecl,
    GroupNorm,
    Heartbeat,
    Hello,
    Norms,
    WireError,
    decode,
    encode,
)
from esper_telemetry.daemon.aggregator import Aggregator
from esper_telemetry.daemon.fastdecode import (
    WIRE_NORMS,
    Columns,
    NormsV2,
    decode_columns,
    decode_norms,
)
from esper_telemetry.daemon.stats import DaemonStats
from esper_telemetry.defaults import MAX_GROUPS_PER_EVENT, MAX_STRING_CHARS
from esper_telemetry.events import ROLES

MAX_INT64 = (1 << 63) - 1
FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

HEALTHY = Norms(
    "run-1",
    3,
    1_700_000_001.5,
    7,
    False,
    (
        GroupNorm("host", "host", 1_000_000, 12.5, 0, False, False),
        GroupNorm("seed0", "seed", 1234, None, 0, False, True),
        GroupNorm("seed1", "seed", 1234, 0.0, 0, False, True),
    ),
)


def records(wire_events):
    """The fast path's structs as the records ``decode`` gives."""
    assert type(wire_events) is tuple and wire_events
    assert all(type(e) in WIRE_NORMS for e in wire_events)
    return [
        Norms(
            e.run,
            e.rank,
            e.time,
            e.step,
            e.skipped,
            tuple(GroupNorm(*g) for g in e.groups),  # fingerprint None before schema 3
            world=e.world,
            seq=e.seq,
        )
        for e in wire_events
    ]


def assert_identical(got, want):
    assert type(got) is type(want), (got, want)
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_identical(g, w)
    elif isinstance(want, float) and want != want:
        assert got != got, (got, want)
    else:
        assert got == want, (got, want)


# Frames the column decoder took in ``check`` (the fuzz tests show it was reached).
COLUMNS_TAKEN = Counter()


def check(frame) -> str:
    """The fast paths' answers for ``frame`` are ``decode``'s, or they decline: "fast",
    "declined" (decode accepts) or decode's reason. The column decoder answers only for
    what the struct decoder takes."""
    fast = decode_norms(frame)
    cols = decode_columns(frame)
    try:
        want = decode(frame)
    except WireError as err:
        assert fast is None and cols is None, (frame, err.reason)
        return err.reason
    if cols is not None:
        COLUMNS_TAKEN["frames"] += 1
        assert fast is not None, frame
        assert len(cols) == len(want) and cols.messages == 1
        assert_identical(records(tuple(cols.events())), want)
    if fast is None:
        return "declined"
    assert_identical(records(fast), want)
    return "fast"


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def wire(event, seq=None, v=None) -> dict:
    """The map of a ``Norms`` as a sender of schema ``v`` writes it (by default 1 without
    ``seq``, else the current one): from schema 3 with the world size and each group's
    fingerprint, before it without."""
    v = v if v is not None else 1 if seq is None else 3
    out = {"v": v, "event": "norms"}
    for k in ("run", "rank", "time", "step", "skipped", "groups"):
        value = getattr(event, k)
        out[k] = [list(g)[: 8 if v >= 3 else 7] for g in value] if k == "groups" else value
    if v >= 3:
        out["world"] = event.world
    if seq is not None:
        out["seq"] = seq
    return out


def v3_wire(event, seq=1) -> dict:
    """The map of a ``Norms`` as ``encode`` writes it (schema 3, numbered)."""
    return msgpack.unpackb(encode(event, seq=seq))


# --- what the fast path takes --------------------------------------------------------


@pytest.mark.parametrize("seq", [None, 0, 5, MAX_INT64])
def test_it_takes_what_collectors_send_single_and_batched(seq):
    for world in (None, 1, 4096):
        healthy = HEALTHY._replace(world=world if seq is not None else None)
        assert check(encode(healthy, seq=seq)) == "fast"
        batch = [healthy._replace(step=s) for s in range(20)]  # an array 16 header
        assert check(encode(batch, seq=seq)) == "fast"
        assert type(decode_columns(encode(batch, seq=seq))) is Columns
        assert check(encode(batch[:3], seq=seq)) == "fast"  # a fixarray


@pytest.mark.parametrize("seq", [0, 5, MAX_INT64])
def test_it_takes_what_collectors_of_schema_2_send_with_no_world(seq):
    single = decode_norms(pack(wire(HEALTHY, seq, v=2)))
    assert type(single[0]) is NormsV2 and single[0].world is None
    assert check(pack(wire(HEALTHY, seq, v=2))) == "fast"
    batch = [wire(HEALTHY._replace(step=s), seq, v=2) for s in range(20)]
    assert check(pack(batch)) == "fast"
    assert check(pack(batch[:3])) == "fast"
    # Schema 3 and 2 maps in one batch: decode refuses it ("version"), so must the fast path.
    assert check(pack([wire(HEALTHY, seq), wire(HEALTHY, seq, v=2)])) == "version"


def test_a_batch_of_one_is_taken_without_the_canonical_check_only_from_a_fixmap():
    assert check(encode([HEALTHY], seq=1)) == "fast"
    assert check(encode([HEALTHY])) == "fast"
    assert check(pack([dict(reversed(list(wire(HEALTHY, 1).items())))])) == "declined"
    assert check(b"\x91" + _17_KEYS_WITH_REPEATS) == "limit"
    assert check(b"\x91\xde\x00\x0a" + pack(wire(HEALTHY, 1))[1:]) == "declined"


def test_a_single_event_may_have_its_keys_in_any_order():
    assert check(pack(dict(reversed(list(wire(HEALTHY, 1).items()))))) == "fast"
    assert check(pack(dict(sorted(wire(HEALTHY).items())))) == "fast"


def test_limits_are_inclusive_on_the_fast_path_too():
    groups = tuple(
        GroupNorm(f"g{i}", ROLES[i % 3], MAX_INT64, float(i), 0, False, False)
        for i in range(MAX_GROUPS_PER_EVENT)
    )
    big = HEALTHY._replace(
        run="r" * MAX_STRING_CHARS, rank=MAX_INT64, step=MAX_INT64, groups=groups
    )
    assert check(encode(big, seq=MAX_INT64)) == "fast"
    assert check(encode(HEALTHY._replace(groups=()), seq=1)) == "fast"
    edge = HEALTHY._replace(
        time=0.0,
        groups=(
            GroupNorm("é" * MAX_STRING_CHARS, "group", 0, -0.0, 0, False, False),
            GroupNorm("x", "seed", 0, 1.7976931348623157e308, 0, False, True),
        ),
    )
    assert check(encode(edge, seq=1)) == "fast"


# --- what it leaves to decode --------------------------------------------------------

_17_KEYS_WITH_REPEATS = (
    b"\xde\x00\x11"  # a map 16 header: 17 entries, 9 distinct keys
    + b"".join(pack(k) + pack(v) for k, v in wire(HEALTHY, 4).items())
    + b"".join(pack("run") + pack("run-1") for _ in range(8))
)

DECLINED = {
    # valid, for decode and the record path
    "non-finite count with a finite sum": encode(
        HEALTHY._replace(groups=(GroupNorm("host", "host", 1, 1.0, 2, False, False),)), seq=1
    ),
    "+Inf sum with its count": encode(
        HEALTHY._replace(groups=(GroupNorm("host", "host", 1, math.inf, 1, False, False),)), seq=1
    ),
    "NaN sum with its count": encode(
        HEALTHY._replace(groups=(GroupNorm("host", "host", 1, math.nan, 1, False, False),)), seq=1
    ),
    "a heartbeat in the batch": encode([HEALTHY, Heartbeat("run-1", 3, 1.0, 1, 0, 0, 0)], seq=1),
    "a hello": encode(
        Hello("run-1", 0, 1.0, 1, "h", 1, "0", "0", (GroupDecl("host", "host", 1, False),)), seq=0
    ),
    "schema 1 batch of two runs": encode([HEALTHY, HEALTHY._replace(run="other")]),
    "schema 1 batch of two ranks": encode([HEALTHY, HEALTHY._replace(rank=0)]),
    "integer time (not canonical in a batch)": pack([wire(HEALTHY._replace(time=5), 1)] * 2),
    "float32 time (not canonical in a batch)": msgpack.packb(
        [wire(HEALTHY, 1)] * 2, use_bin_type=True, use_single_float=True
    ),
    "keys in another order, in a batch (not canonical)": pack(
        [dict(reversed(list(wire(HEALTHY, 1).items())))] * 2
    ),
    "batch of one map 16 of ten keys": b"\x91\xde\x00\x0a" + pack(wire(HEALTHY, 1))[1:],
    # rejected by decode
    "a map of 17 entries, keys repeated, in a batch": b"\x92"
    + pack(wire(HEALTHY, 4))
    + _17_KEYS_WITH_REPEATS,
    "a map of 17 entries, keys repeated, alone": _17_KEYS_WITH_REPEATS,
    "mixed versions": pack([wire(HEALTHY, 1), wire(HEALTHY)]),
    "mixed versions, the other way": pack([wire(HEALTHY), wire(HEALTHY, 1)]),
    "two seqs": encode([HEALTHY], seq=1)[:-1] + pack(wire(HEALTHY, 1)) + pack(wire(HEALTHY, 2)),
    "two runs in a numbered batch": pack([wire(HEALTHY, 1), wire(HEALTHY._replace(run="x"), 1)]),
    "two ranks in a numbered batch": pack([wire(HEALTHY, 1), wire(HEALTHY._replace(rank=0), 1)]),
    "NaN sum without a count": encode(
        HEALTHY._replace(groups=(GroupNorm("host", "host", 1, math.nan, 0, False, False),)), seq=1
    ),
    "+Inf time": pack(wire(HEALTHY._replace(time=math.inf), 1)),
    "negative step": pack(wire(HEALTHY._replace(step=-1), 1)),
    "step over int64": pack(wire(HEALTHY._replace(step=MAX_INT64 + 1), 1)),
    "run too long": encode(HEALTHY._replace(run="r" * (MAX_STRING_CHARS + 1)), seq=1),
    "empty run": encode(HEALTHY._replace(run=""), seq=1),
    "unknown role": pack(
        wire(HEALTHY._replace(groups=(("a", "boss", 1, 1.0, 0, False, False),)), 1)
    ),
    "group of 8 fields (schema 2)": pack(
        {**wire(HEALTHY, 1, v=2), "groups": [["a", "host", 1, 1.0, 0, False, False, 0]]}
    ),
    "group of 7 fields (schema 3)": pack(
        {**v3_wire(HEALTHY), "groups": [["a", "host", 1, 1.0, 0, False, False]]}
    ),
    "group of 9 fields (schema 3)": pack(
        {**v3_wire(HEALTHY), "groups": [["a", "host", 1, 1.0, 0, False, False, 0, 0]]}
    ),
    "negative fingerprint": pack(
        {**v3_wire(HEALTHY), "groups": [["a", "host", 1, 1.0, 0, False, False, -1]]}
    ),
    "float fingerprint": pack(
        {**v3_wire(HEALTHY), "groups": [["a", "host", 1, 1.0, 0, False, False, 1.0]]}
    ),
    "too many groups": encode(
        HEALTHY._replace(groups=HEALTHY.groups[:1] * (MAX_GROUPS_PER_EVENT + 1)), seq=1
    ),
    "bin run": pack({**wire(HEALTHY, 1), "run": b"run-1"}),
    "extra field": pack({**wire(HEALTHY, 1), "extra": 1}),
    "v=2 without seq": pack({**wire(HEALTHY), "v": 2}),
    "v=3 without seq": pack({**wire(HEALTHY), "v": 3}),
    "v=2 with a world": pack({**wire(HEALTHY, 1), "v": 2}),
    "v=3 without world": pack(wire(HEALTHY, 1, v=2) | {"v": 3}),
    "world 0": pack(wire(HEALTHY._replace(world=0), 1)),
    "world as bool": pack(wire(HEALTHY._replace(world=True), 1)),
    "world over int64": pack(wire(HEALTHY._replace(world=MAX_INT64 + 1), 1)),
    "v=1 with seq": pack({**wire(HEALTHY, 1), "v": 1}),
    "trailing byte": encode(HEALTHY, seq=1) + b"\x00",
    "truncated": encode([HEALTHY] * 2, seq=1)[:-1],
    "empty batch": pack([]),
}


@pytest.mark.parametrize("frame", list(DECLINED.values()), ids=list(DECLINED))
def test_it_leaves_the_rest_to_decode(frame):
    assert decode_norms(frame) is None
    check(frame)


def test_the_cases_reach_both_outcomes_of_decode():
    outcomes = Counter(check(f) for f in DECLINED.values())
    assert outcomes["declined"] >= 10 and outcomes["limit"] >= 2, outcomes
    assert {"schema", "version", "value", "malformed"} <= set(outcomes), outcomes


def test_repeated_keys_are_left_to_decode_which_reads_them_last_wins():
    items = list(wire(HEALTHY, 4).items()) + [("step", 9), ("run", "again")]
    frame = b"\x8c" + b"".join(pack(k) + pack(v) for k, v in items)  # 12 entries
    assert check(frame) == "declined"
    assert decode(frame)[0].step == 9 and decode(frame)[0].run == "again"
    assert check(b"\x91" + frame) == "declined"


@pytest.mark.parametrize(
    "message",
    [encode(HEALTHY, seq=2), encode([HEALTHY] * 2, seq=3), encode([HEALTHY] * 2)],
    ids=["single", "batch", "v1"],
)
def test_every_single_bit_flip_is_decodes_or_declined(message):
    seen = Counter()
    taken = COLUMNS_TAKEN["frames"]
    for index in range(len(message)):
        for bit in range(8):
            frame = bytearray(message)
            frame[index] ^= 1 << bit
            seen[check(bytes(frame))] += 1
    assert seen["fast"] > 0 and seen["malformed"] > 0 and seen["schema"] > 0, seen
    if message[0] != 0x8A:  # a batch: flips of its times and values stay in columns
        assert COLUMNS_TAKEN["frames"] - taken > 50, COLUMNS_TAKEN


def test_seeded_random_splices_of_valid_frames():
    rng = random.Random(7)
    frames = [
        encode(HEALTHY, seq=2),
        encode([HEALTHY._replace(step=s) for s in range(17)], seq=3),
        encode([HEALTHY] * 3),
    ]
    seen = Counter()
    for _ in range(3000):
        frame = bytearray(rng.choice(frames))
        at = rng.randrange(len(frame))
        chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        how = rng.randrange(3)
        if how == 0:
            frame[at : at + len(chunk)] = chunk
        elif how == 1:
            frame[at:at] = chunk
        else:
            del frame[at : at + len(chunk)]
        seen[check(bytes(frame))] += 1
    assert seen["fast"] > 0 and len(seen) >= 3, seen


# --- hypothesis: events made to be near the fast path's edges -----------------------

NAMES = st.text(min_size=1, max_size=MAX_STRING_CHARS) | st.sampled_from(["host", "seed0"])
COUNTS = st.integers(0, 3) | st.integers(0, MAX_INT64)
FLOATS = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
SQUARES = st.none() | FLOATS | st.sampled_from([math.inf, math.nan])
GROUPS = st.builds(
    lambda name, role, params, sq, nonfinite, sharded, isolated, fingerprint: GroupNorm(
        name,
        role,
        params,
        sq if nonfinite or sq is None or math.isfinite(sq) else 1.0,
        nonfinite,
        sharded,
        isolated,
        fingerprint,
    ),
    NAMES,
    st.sampled_from(ROLES),
    COUNTS,
    SQUARES,
    st.sampled_from([0, 0, 0, 1]),
    st.sampled_from([False, False, False, True]),
    st.booleans(),
    st.none() | COUNTS,  # the fingerprint: written from schema 3 on
)
NORMS = st.builds(
    Norms,
    NAMES,
    COUNTS,
    FLOATS,
    COUNTS,
    st.booleans(),
    st.lists(GROUPS, max_size=4).map(tuple),
    st.none() | st.integers(1, MAX_INT64),  # world
)


@FUZZ
@given(st.lists(NORMS, min_size=1, max_size=20), st.none() | COUNTS, st.booleans())
def test_valid_norms_messages_take_the_fast_path_exactly_when_healthy(events, seq, single):
    # One sender's message, numbered by ``seq`` (None: schema 1), of one world size.
    first = events[0]
    events = [
        e._replace(run=first.run, rank=first.rank, world=first.world, seq=None) for e in events
    ]
    message = events[0] if single else events
    frame = encode(message, seq=seq)
    outcome = check(frame)
    healthy = all(
        g.nonfinite == 0 and (g.sq is None or math.isfinite(g.sq))
        for e in (events[:1] if single else events)
        for g in e.groups
    )
    assert outcome == ("fast" if healthy else "declined")


LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=2)
    | st.sampled_from(["norms", "host", "seed", 1, 2, MAX_INT64 + 1])
)


@FUZZ
@given(
    NORMS,
    st.none() | COUNTS,
    st.sampled_from(["replace", "drop", "add", "group"]),
    st.data(),
    st.integers(0, 3),
)
def test_near_valid_norms_are_never_taken_unless_decode_agrees(base, seq, how, data, more):
    w = wire(base, seq)
    key = data.draw(st.sampled_from(sorted(w)))
    if how == "replace":
        w[key] = data.draw(LEAVES)
    elif how == "drop":
        del w[key]
    elif how == "add":
        w[data.draw(st.sampled_from(["v", "run", "step", "seq", "x"]))] = data.draw(LEAVES)
    elif w["groups"]:
        group = w["groups"][data.draw(st.integers(0, len(w["groups"]) - 1))]
        group[data.draw(st.integers(0, 6))] = data.draw(LEAVES)
    check(pack(w))
    healthy = wire(base._replace(groups=()), seq)
    check(pack([healthy] * more + [w]))


# --- columns: one sender's captures read by their layout ---------------------------

# Values around every width an integer's encoding changes at, and floats at the edges.
STEPS = st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, MAX_INT64])
VALUES = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 5e-324, 1.7976931348623157e308, math.inf, math.nan, -1.0]
)


@st.composite
def one_sender(draw):
    """One sender's captures of one layout: only time, step and values differ."""
    base = draw(NORMS)
    n = draw(st.integers(1, 40))
    step = draw(STEPS | st.integers(0, MAX_INT64))
    counting = draw(st.booleans())  # steps one after another, or anywhere
    out = []
    for i in range(n):
        groups = tuple(
            g._replace(sq=None if g.sq is None else draw(VALUES), nonfinite=0) for g in base.groups
        )
        time_ = draw(st.sampled_from([base.time, 0.0]) | VALUES)
        s = min(step + i, MAX_INT64) if counting or draw(st.booleans()) else draw(STEPS)
        out.append(base._replace(time=time_, step=s, groups=groups, seq=None))
    return out


@FUZZ
@given(one_sender(), st.none() | COUNTS)
def test_a_senders_batch_in_columns_is_what_decode_gives_or_declined(events, seq):
    frame = encode(events, seq=seq)
    outcome = check(frame)
    cols = decode_columns(frame)
    same_width = len({len(encode(e, seq=seq)) for e in events}) == 1
    healthy = outcome in ("fast", "declined") and all(
        e.time - e.time == 0.0
        and e.time >= 0
        and all(g.sq is None or (g.sq - g.sq == 0.0 and g.sq >= 0) for g in e.groups)
        for e in events
    )
    if len(events) > 1 and same_width and healthy:
        assert cols is not None  # what it is for: nothing left to the slower paths
    elif not healthy:
        assert cols is None


@FUZZ
@given(one_sender(), COUNTS | st.none(), st.booleans(), st.data())
def test_lone_captures_joined_are_each_what_decode_gives_or_declined(events, seq, wrapped, data):
    # As the receiver joins a sender's lone captures: each its own message, numbered on.
    from esper_telemetry.daemon.fastdecode import columns

    seqs = [None if seq is None else min(seq + i, MAX_INT64) for i in range(len(events))]
    frames = [encode([e] if wrapped else e, seq=q) for e, q in zip(events, seqs)]
    if data.draw(st.booleans()):  # and now and then one byte of one of them off
        k = data.draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[k])
        frame[data.draw(st.integers(0, len(frame) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        frames[k] = bytes(frame)
    # The receiver joins runs of same-sized ones.
    for _size, same in itertools.groupby(frames, len):
        same = list(same)
        cols = columns(b"".join(same), len(same), 1 if wrapped else 0, True)
        if cols is None:
            continue
        assert cols.messages == len(same)
        for frame, event, got_seq in zip(same, cols.events(), cols.seqs):
            want = decode(frame)  # raises if the joined decoder took a frame decode refuses
            assert len(want) == 1 and got_seq == want[0].seq
            assert_identical(records((event,)), want)


@pytest.mark.parametrize("wrapped", [True, False], ids=["batch-of-one", "map"])
@pytest.mark.parametrize("seq", [None, 0, 2**32 - 200])
def test_a_collectors_lone_captures_are_joined_between_the_sizes_numbers_take(wrapped, seq):
    from esper_telemetry.daemon.fastdecode import columns

    frames = []
    for i in range(300):  # steps and numbers cross 128 and 256 (and 2**32): three sizes
        e = HEALTHY._replace(step=i, time=1.0 + i, world=None if seq is None else 8)
        e = e._replace(
            groups=tuple(g._replace(sq=None if g.sq is None else i / 7) for g in e.groups)
        )
        frames.append(encode([e] if wrapped else e, seq=None if seq is None else seq + i))
    runs = [list(same) for _size, same in itertools.groupby(frames, len)]
    assert len(runs) >= 3
    for same in runs:
        cols = columns(b"".join(same), len(same), 1 if wrapped else 0, True)
        assert cols is not None and cols.messages == len(same)
        want = [event for frame in same for event in decode(frame)]
        assert list(cols.seqs) == [e.seq for e in want]
        assert_identical(records(tuple(cols.events())), want)


# --- the aggregator: the same state from the structs as from the records ------------


def _traffic(rng: random.Random, n: int):
    """Seeded messages as collectors (and some odd senders) send them: encoded frames.

    Mostly healthy replicated captures of a layout that rarely changes, with steps that
    mostly go up; and now and then a run or rank past the caps, a sharded or non-finite
    group, a step going back, a changed layout, a hello, heartbeat or goodbye, a gap or a
    restart in the message numbers, a schema 1 sender.
    """
    names = ["host", "s0", "s1", "s2"]
    layouts = {run: rng.sample(names, 2) for run in "abcd"}
    worlds = {"a": None, "b": 2, "c": 2, "d": None}
    steps = Counter()
    seqs = Counter()
    for _ in range(n):
        run = rng.choice("aaabbbccd")
        rank = rng.choice([0, 0, 0, 0, 0, 1, 1, 2])
        roll = rng.random()
        if roll < 0.03:
            events = [
                Hello(
                    run,
                    rank,
                    1.0,
                    rng.choice([1, 2]),
                    "h",
                    1,
                    "0",
                    "0",
                    (GroupDecl("host", "host", 5, False),),
                )
            ]
        elif roll < 0.05:
            events = [Goodbye(run, rank, 2.0, "closed")]
        elif roll < 0.07:
            events = [Heartbeat(run, rank, 2.0, 1, rng.randrange(3), 0, 0)]
        else:
            if rng.random() < 0.03:
                layouts[run] = rng.sample(names, rng.randint(1, 3))
            odd = rng.random() < 0.1  # a sharded or non-finite group somewhere
            events = []
            for _ in range(rng.choice([1, 1, 2, 5, 17])):
                layout = layouts[run]
                if rng.random() < 0.03:
                    layout = rng.sample(names, rng.randint(1, 3))
                groups = tuple(
                    GroupNorm(
                        name,
                        "seed" if name[0] == "s" else "host",
                        7,
                        rng.choice([None, float(rng.randrange(5)), 0.5]),
                        1 if odd and rng.random() < 0.3 else 0,
                        odd and rng.random() < 0.3,
                        name != "host",
                        # Schema 3's fingerprint (layout.py): runs c and d hold their seeds
                        # as fingerprinted groups (d of an unknown world).
                        5 if run in "cd" and name != "host" else None,
                    )
                    for name in layout
                )
                steps[run] += 1
                step = steps[run] if rng.random() < 0.97 else rng.randrange(steps[run] + 1)
                # Schema 3's world: mostly the run's, now and then another (rank 1 of a
                # world of 1 is refused, 3 is past the run's rank cap) or a mixed message.
                world = worlds[run] if rng.random() < 0.95 else rng.choice([None, 1, 2, 3])
                events.append(Norms(run, rank, 1.0 + rng.random(), step, False, groups, world))
        seq = None
        if rng.random() < 0.9:
            seqs[run, rank] += rng.choice([1] * 20 + [2])
            seq = seqs[run, rank] if rng.random() < 0.99 else 0
        yield encode(events if len(events) > 1 or rng.random() < 0.5 else events[0], seq=seq)


def _traffic_limits():
    """Caps small enough for ``_traffic`` to reach them: runs, groups and ranks refused."""
    return make_limits(
        max_runs=3,
        max_groups_per_run=3,
        max_ranks_per_run=2,
        ttl_s=5.0,
        ended_retention_s=1.0,
        evict_after_s=2.0,
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_aggregator_reaches_the_same_state_from_structs_as_from_records(seed, monkeypatch):
    limits = _traffic_limits()
    fast_agg = Aggregator(limits, DaemonStats(), logging.getLogger("test.fast"))
    ref_agg = Aggregator(limits, DaemonStats(), logging.getLogger("test.ref"))
    taken = Counter()
    as_records = Aggregator._wire_norms_as_records

    def counted(self, events):
        taken["records"] += 1
        return as_records(self, events)

    monkeypatch.setattr(Aggregator, "_wire_norms_as_records", counted)
    rng = random.Random(seed)
    now = 1000.0
    for i, frame in enumerate(_traffic(rng, 3000)):
        now += rng.choice([0.0, 0.0, 0.01, 0.1])
        if rng.random() < 0.05:
            fast_agg.tick(now)
            ref_agg.tick(now)
        fast = decode_norms(frame)
        taken["fast" if fast is not None else "decode"] += 1
        fast_agg.apply_batch(fast if fast is not None else decode(frame), now)
        ref_agg.apply_batch(decode(frame), now)
        assert repr(fast_agg.snapshot()) == repr(ref_agg.snapshot())
        if i % 20 == 0:  # every step too: the fast path keeps its captures to read in bulk
            for run in "abcd":
                assert repr(fast_agg.history(run)) == repr(ref_agg.history(run)), (i, run)
    snap = ref_agg.snapshot()
    # The traffic reached every branch: the fast path applied once and as records, the
    # codec's path, the caps, the loss accounting.
    assert taken["fast"] - taken["records"] > 400 and taken["records"] > 300, taken
    assert taken["decode"] > 200, taken
    assert snap.overflow["groups"] and snap.overflow["runs"] + snap.overflow["ranks"], snap
    assert sum(snap.messages_lost.values()) > 0 and snap.unsequenced_messages > 0, snap


def _received(bursts, joined: bool):
    """What the receiver queues for each burst of frames (a turn's worth each), through a
    real PULL socket; ``joined`` False: without the column decoders (message by message,
    in the same order)."""
    import zmq
    import zmq.asyncio
    from daemon_support import inproc_receiver

    from esper_telemetry.daemon import receiver
    from esper_telemetry.daemon.queue import EventQueue

    async def run():
        ctx = zmq.asyncio.Context()
        stats = DaemonStats()
        queue = EventQueue(1 << 20)
        rx = inproc_receiver(ctx, f"traffic-{joined}", queue, stats)
        push = zmq.Context.shadow(ctx.underlying).socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(f"inproc://traffic-{joined}")
        backlog = rx.backlogs[0]
        backlog.limit = 64 << 20
        backlog.counted_at = float("inf")
        shadow = zmq.Socket.shadow(rx._sockets[0].underlying)
        out = []
        for burst in bursts:
            for frame in burst:
                push.send(frame)
            sent = stats.messages + len(burst)
            while stats.messages < sent:
                rx._take(shadow, backlog)
            items = []
            while (events := queue.get()) is not None:
                items.append(events)
            out.append(items)
        push.close(linger=0)
        rx.close()
        ctx.term()
        return out

    if joined:
        return asyncio.run(run())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(receiver, "columns", lambda *a, **k: None)
        mp.setattr(receiver, "decode_columns", lambda *a, **k: None)
        return asyncio.run(run())


def _same_state_through_the_receiver(frames, rng, limits, runs, sizes, gaps):
    """``frames`` in bursts of ``sizes`` through the receiver with columns and message by
    message (the same order), applied ``gaps`` apart with ticks now and then: the same
    snapshots and histories (of ``runs``) after every burst. The records' aggregator."""
    frames = list(frames)
    bursts = []
    while frames:
        k = rng.choice(sizes)
        bursts.append(frames[:k])
        del frames[:k]
    got = _received(bursts, joined=True)
    want = _received(bursts, joined=False)
    assert sum(len(items) for items in got) < sum(len(items) for items in want)
    joined = Counter(type(events).__name__ for items in got for events in items)
    assert joined["Columns"] > 50, joined
    col_agg = Aggregator(limits, DaemonStats(), logging.getLogger("test.columns"))
    ref_agg = Aggregator(limits, DaemonStats(), logging.getLogger("test.ref"))
    now = 1000.0
    for i, (mine, theirs) in enumerate(zip(got, want)):
        now += rng.choice(gaps)
        if rng.random() < 0.1:
            col_agg.tick(now)
            ref_agg.tick(now)
        for events in mine:
            col_agg.apply_batch(events, now)
        for events in theirs:
            ref_agg.apply_batch(events, now)
        assert repr(col_agg.snapshot()) == repr(ref_agg.snapshot()), i
        for run in runs:
            assert repr(col_agg.history(run)) == repr(ref_agg.history(run)), (i, run)
    return ref_agg


@pytest.mark.parametrize("seed", [4, 5])
def test_the_aggregator_reaches_the_same_state_from_columns_as_message_by_message(seed):
    limits = _traffic_limits()
    rng = random.Random(seed)
    frames = list(_traffic(rng, 3000))
    # Lone captures of the runs' first ranks, many in a row: what the receiver joins.
    for i in range(300):
        groups = (GroupNorm("host", "host", 7, float(i % 5), 0, False, False),)
        frames.insert(
            rng.randrange(len(frames)), encode([Norms("e", 0, 1.0, 10 + i, False, groups)], seq=i)
        )
    ref_agg = _same_state_through_the_receiver(
        frames, rng, limits, "abcde", [1, 3, 40, 200], [0.0, 0.01, 0.1]
    )
    assert ref_agg.snapshot().messages_lost  # the loss accounting was reached


def _ddp_traffic(rng: random.Random, steps: int):
    """A DDP-like job of 4 ranks (world 4): a replicated group (one fingerprint), experts
    split across ranks (a fingerprint each), a replica now and then off by a bit, lagging
    and restarted ranks; lone captures and batches, numbered per rank."""
    seqs = Counter()
    done = Counter()
    frames = []
    for _ in range(steps):
        rank = rng.randrange(4)
        n = rng.choice([1, 1, 1, 3])
        events = []
        for _ in range(n):
            done[rank] += 1 if rng.random() < 0.97 else -rng.randrange(3)
            step = max(done[rank], 0)
            base = 1.0 + step % 5
            shared = base if rng.random() < 0.98 else base + 0.5  # a replica that disagrees
            groups = (
                GroupNorm("dense", "host", 100, shared, 0, False, False, 77),
                GroupNorm("experts", "seed", 50, base * (rank + 1), 0, True, True, 100 + rank),
            )
            events.append(Norms("ddp", rank, 1.0 + step, step, False, groups, 4))
        seqs[rank] += 1
        frames.append(encode(events if n > 1 else [events[0]], seq=seqs[rank]))
    return frames


@pytest.mark.parametrize("seed", [6, 7])
def test_a_ddp_jobs_captures_reach_the_same_state_in_columns_as_message_by_message(seed):
    rng = random.Random(seed)
    ref_agg = _same_state_through_the_receiver(
        _ddp_traffic(rng, 1500), rng, make_limits(), ["ddp"], [1, 4, 40, 200], [0.0, 0.01, 0.5]
    )
    (run,) = ref_agg.snapshot().runs
    groups = {g.name: g for g in run.groups}
    assert groups["dense"].step > 100 and groups["experts"].step > 100  # steps complete


def _both(frames, now=1000.0):
    """Aggregators fed ``frames``: the fast path's structs, its columns (where a frame is a
    batch they take) and decode's records; the same snapshots and histories."""
    fast_agg = Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.fast"))
    col_agg = Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.columns"))
    ref_agg = Aggregator(make_limits(), DaemonStats(), logging.getLogger("test.ref"))
    for i, frame in enumerate(frames):
        fast = decode_norms(frame)
        fast_agg.apply_batch(fast if fast is not None else decode(frame), now + i)
        cols = decode_columns(frame)
        col_agg.apply_batch(cols if cols is not None else decode(frame), now + i)
        ref_agg.apply_batch(decode(frame), now + i)
    want = repr(ref_agg.snapshot())
    assert repr(fast_agg.snapshot()) == want
    assert repr(col_agg.snapshot()) == want
    for run in {e.run for frame in frames for e in decode(frame)}:
        want = repr(ref_agg.history(run))
        assert repr(fast_agg.history(run)) == want and repr(col_agg.history(run)) == want
    return ref_agg.snapshot()


def test_a_message_that_passes_the_runs_latest_step_and_then_goes_back_lands_on_its_last():
    g = (GroupNorm("g", "host", 1, 1.0, 0, False, False),)
    snap = _both(
        [
            encode(Norms("r", 1, 1.0, 20, False, g), seq=0),
            encode(Norms("r", 0, 2.0, 30, False, ()), seq=0),  # rank 0 moves the run to 30
            # Rank 1's message passes 30, then steps back (a restart): in order, the run's
            # latest capture is its last event, step 21.
            encode([Norms("r", 1, 3.0, 31, False, g), Norms("r", 1, 4.0, 21, False, g)], seq=1),
        ]
    )
    (run,) = snap.runs
    assert (run.last_step, run.collector_time, run.captures) == (21, 4.0, 4)


def test_a_group_behind_another_ranks_step_is_applied_as_records():
    h = (
        GroupNorm("h", "host", 1, 1.0, 0, False, False),
        GroupNorm("g", "host", 1, 2.0, 0, False, False),
    )
    snap = _both(
        [
            encode(Norms("r", 0, 1.0, 5, False, h), seq=0),
            encode(Norms("r", 1, 1.0, 9, False, h[1:]), seq=0),  # g at step 9 from rank 1
            encode(
                Norms("r", 0, 1.0, 6, False, (h[0]._replace(sq=3.0), h[1]._replace(sq=4.0))), seq=1
            ),  # h moves on; g stays at rank 1's step 9
        ]
    )
    groups = {g.name: (g.sq, g.step) for g in snap.runs[0].groups}
    assert groups == {"h": (3.0, 6), "g": (2.0, 9)}


def _steps(run, rank, steps, seq, sq=1.0, world=None, fingerprint=None):
    """One message of ``rank``'s captures of ``steps`` (one group), numbered ``seq``."""
    events = [
        Norms(
            run,
            rank,
            1.0 + s,
            s,
            False,
            (GroupNorm("g", "host", 4, sq + s + k, 0, False, False, fingerprint),),
            world,
        )
        for k, s in enumerate(steps)
    ]
    return encode(events if len(events) > 1 else events[0], seq=seq)


def test_a_rank_that_took_a_step_over_from_another_records_its_next_copy_of_it():
    # Rank 1's first copy of step 31 is a replica's (rank 0 recorded 31); from then rank 1
    # holds the group, and its next capture numbered 31 (a restart) is recorded.
    _both(
        [
            _steps("r", 0, [30], 0),
            _steps("r", 1, [30], 0),
            _steps("r", 0, [31], 1),
            _steps("r", 1, [31, 31, 32, 33], 1),
        ]
    )


def test_a_step_a_gone_rank_recorded_is_not_recorded_again_by_the_one_left():
    _both(
        [
            _steps("r", 0, [4], 0),
            _steps("r", 1, [4], 0),
            _steps("r", 1, [5], 1, sq=9.0),
            encode(Goodbye("r", 1, 1.0, "done"), seq=2),
            _steps("r", 0, [5, 6, 7], 1),
        ]
    )


@pytest.mark.parametrize("world", [None, 2, 1])
def test_fingerprinted_groups_of_a_run_of_one_rank_whatever_its_world(world):
    # World unknown: the steps wait for it (layout.py), on every path; a world of one: the
    # rank's values are the group's; a world of two with one rank heard: they wait.
    _both(
        [
            _steps("r", 0, [3], 0, world=world, fingerprint=5),
            _steps("r", 0, [4, 5, 6], 1, world=world, fingerprint=5),
        ]
    )


def test_a_clip_threshold_announced_judges_only_the_steps_after_it():
    # Steps the fast paths keep to read in bulk were captured before the Hello that sets
    # the threshold: they are not clipped by it (the records path judges each as it comes).
    decl = (GroupDecl("g", "host", 4, False),)
    hello = Hello("r", 0, 1.0, 1, "h", 1, "0", "0", decl, 1.0)
    snap = _both(
        [
            _steps("r", 0, [1], 0, sq=3.0, world=1),
            _steps("r", 0, [2, 3], 1, sq=3.0, world=1),
            encode(hello, seq=2),
            _steps("r", 0, [4, 5], 3, sq=3.0, world=1),
        ]
    )
    (run,) = snap.runs
    assert (run.model_steps, run.clipped, run.clip_threshold) == (5, 2, 1.0)


def test_a_world_that_shrinks_to_one_rank_with_a_step_waiting_for_the_other():
    _both(
        [
            _steps("r", 0, [5], 0, world=2, fingerprint=5),
            _steps("r", 1, [4], 0, world=2, fingerprint=5),
            _steps("r", 0, [6, 7], 1, world=1, fingerprint=5),
            _steps("r", 0, [8, 9], 2, world=1, fingerprint=5),
        ]
    )


# --- through the daemon's socket -----------------------------------------------------


async def test_the_daemon_takes_both_paths_and_rejects_what_decode_rejects(start_daemon, push):
    d = await start_daemon()
    sock = push(d.endpoint)
    sock.send(encode([HEALTHY._replace(step=s) for s in range(1, 5)], seq=0))
    sock.send(
        encode(
            HEALTHY._replace(
                step=5, groups=(GroupNorm("host", "host", 1_000_000, math.inf, 3, False, False),)
            ),
            seq=1,
        )
    )
    sock.send(b"\x92" + pack(wire(HEALTHY, 2)) + _17_KEYS_WITH_REPEATS)
    sock.send(encode(HEALTHY._replace(step=6), seq=3))

    samples = {}

    def settled() -> bool:
        return samples.get("messages") == 4.0

    async def scraped() -> None:
        while True:
            s = await d.scrape()
            samples.update(s=s, messages=get(s, "esper_daemon_messages_total"))
            if samples["messages"] == 4.0 and get(s, "esper_daemon_events_total") == 6.0:
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(scraped(), 10.0)
    s = samples["s"]
    assert get(s, "esper_daemon_events_total") == 6.0
    assert get(s, "esper_daemon_rejected_total", reason="limit") == 1.0
    assert get(s, "esper_daemon_rejected_total", reason="internal") == 0.0
    assert get(s, "esper_messages_lost_total", run="run-1", rank="3") == 1.0  # seq 2
    assert get(s, "esper_grad_nonfinite_total", run="run-1", group="host") == 1.0
    assert get(s, "esper_last_step", run="run-1") == 6.0
