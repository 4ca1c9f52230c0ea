"""The decoder takes bytes from anyone who can reach the daemon's socket: whatever it is
fed, it returns valid event records or raises ``WireError``, never anything else.

Truncated, bit-flipped, spliced and random frames (seeded, so a failure reproduces), and
hypothesis-generated MessagePack objects, both arbitrary and near-valid (a valid event with
one field broken), in both schema versions (1 without, 2 with a message number). Each frame
either decodes to records that re-encode to the same records,
or raises ``WireError`` with a declared reason. Any other exception fails the test.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_telemetry import (
    REASONS,
    SCHEMA_VERSION,
    DeviceMismatch,
    Goodbye,
    GroupDecl,
    GroupNorm,
    Heartbeat,
    Hello,
    IsolationViolation,
    Norms,
    WireError,
    decode,
    encode,
)
from esper_telemetry.defaults import MAX_STRING_CHARS
from esper_telemetry.events import KIND_OF, ROLES

MAX_INT64 = (1 << 63) - 1
# No example database: the suite must not leave a .hypothesis folder in the checkout.
# Example counts keep this file within about ten seconds.
FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ_SMALL = settings(FUZZ, max_examples=100)

HELLO = Hello(
    "run-1",
    0,
    1700000000.25,
    4,
    "node-a",
    4242,
    "0.1.0",
    "2.13.0",
    (
        GroupDecl("host", "host", 1_000_000, False),
        GroupDecl("seed0", "seed", 1234, True),
    ),
)
NORMS = Norms(
    "run-1",
    1,
    1700000001.5,
    7,
    False,
    (
        GroupNorm("host", "host", 1_000_000, 12.5, 0, False, False),
        GroupNorm("seed0", "seed", 1234, None, 0, False, True),
        GroupNorm("seed1", "seed", 1234, 0.0, 2, True, True),
    ),
)
BATCH = [
    DeviceMismatch("run-1", 3, 2.0, "split", "host", ("cuda:0", "cpu")),
    IsolationViolation("run-1", 0, 3.0, 9, "seed0", "gradient", "got gradient", 0.75),
    Heartbeat("run-1", 0, 4.0, 100, 0, 17, 1),
    Goodbye("run-1", 0, 5.0, "closed"),
]
MESSAGES = [
    encode(HELLO),
    encode(NORMS),
    encode(BATCH),
    encode([e._replace(seq=77, rank=0) for e in [NORMS, *BATCH]]),
]


def assert_identical(got, want):
    assert type(got) is type(want), (got, want)
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_identical(g, w)
    elif isinstance(want, float) and want != want:
        assert got != got, (got, want)  # NaN, which a group's sum of squares may be
    else:
        assert got == want, (got, want)


def check_frame(data) -> str:
    """Decode ``data``; return ``"ok"`` or the rejection reason. Other exceptions escape."""
    try:
        events = decode(data)
    except WireError as err:
        assert err.reason in REASONS, err
        return err.reason
    assert type(events) is list and events
    for event in events:
        assert type(event) in KIND_OF, event
    assert_identical(decode(encode(events)), events)
    return "ok"


# --- frames derived from valid messages -----------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=["hello", "norms", "batch", "numbered"])
def test_every_strict_prefix_is_rejected_as_malformed(message):
    assert check_frame(message) == "ok"
    for end in range(len(message)):
        assert check_frame(message[:end]) == "malformed", end


@pytest.mark.parametrize("message", MESSAGES, ids=["hello", "norms", "batch", "numbered"])
def test_every_single_bit_flip(message):
    seen = Counter()
    for index in range(len(message)):
        for bit in range(8):
            frame = bytearray(message)
            frame[index] ^= 1 << bit
            seen[check_frame(bytes(frame))] += 1
    # The flips reach past the unpacker into the field checks; a flip inside a string or
    # a float's mantissa still decodes. If these fail the fuzz has gone blind, not green.
    assert seen["ok"] > 0, seen
    assert seen["schema"] > 0, seen
    assert seen["malformed"] > 0, seen
    assert sum(seen.values()) == 8 * len(message)


def test_seeded_random_multi_bit_flips_and_splices():
    rng = random.Random(20240601)
    seen = Counter()
    for _ in range(3000):
        frame = bytearray(rng.choice(MESSAGES))
        if rng.random() < 0.5:
            for _ in range(rng.randint(2, 6)):
                frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        else:  # overwrite, insert or delete a short run of random bytes
            at = rng.randrange(len(frame))
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            how = rng.randrange(3)
            if how == 0:
                frame[at : at + len(chunk)] = chunk
            elif how == 1:
                frame[at:at] = chunk
            else:
                del frame[at : at + len(chunk)]
        seen[check_frame(bytes(frame))] += 1
    assert len(seen) >= 3, seen


def test_seeded_random_byte_frames():
    rng = random.Random(1234)
    # Lead bytes that open a map or an array, so many frames get past the first byte.
    openers = [0x80, 0x81, 0x84, 0x86, 0x8F, 0x90, 0x91, 0x93, 0xDC, 0xDE, 0xC0]
    seen = Counter()
    for i in range(6000):
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 96)))
        frame = bytes([rng.choice(openers)]) + body if i % 2 else body
        seen[check_frame(frame)] += 1
    assert seen["malformed"] > 0 and len(seen) >= 2, seen


# --- hypothesis: arbitrary and near-valid MessagePack objects -------------------------

FIELD_NAMES = sorted(
    {"v", "event"}
    | {f for record in KIND_OF for f in record._fields}
    | set(GroupNorm._fields)
    | set(GroupDecl._fields)
)
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=6)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.sampled_from([0, 1, 2, -1, SCHEMA_VERSION, MAX_INT64, MAX_INT64 + 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(
        sorted(KIND_OF.values())
        + list(ROLES)
        + ["", "x" * MAX_STRING_CHARS, "x" * (MAX_STRING_CHARS + 1)]
    )
    | st.text(max_size=12)
    | st.binary(max_size=4)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=3))
)
OBJECTS = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=8) | st.dictionaries(KEYS, children, max_size=12),
    max_leaves=20,
)

NAMES = st.text(min_size=1, max_size=MAX_STRING_CHARS)
STRS = st.text(max_size=MAX_STRING_CHARS)
COUNTS = st.integers(min_value=0, max_value=MAX_INT64)
TIMES = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
SQUARES = st.none() | st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)


@st.composite
def group_norms(draw):
    """A valid GroupNorm: its sum of squares may be +Inf or NaN when it counts non-finite
    gradients."""
    nonfinite = draw(st.integers(0, 3) | COUNTS)
    sq = draw(SQUARES | st.sampled_from([math.inf, math.nan]) if nonfinite else SQUARES)
    return GroupNorm(
        draw(NAMES),
        draw(st.sampled_from(ROLES)),
        draw(COUNTS),
        sq,
        nonfinite,
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.none() | COUNTS),  # the fingerprint (schema 3)
    )


HEAD = dict(run=NAMES, rank=COUNTS, time=TIMES)
TAIL = dict(seq=st.none() | COUNTS)


def schema_1(event):
    """A record as schema 1 can carry it (no ``seq``): no world size, no clip threshold, no
    fingerprints."""
    if event.seq is not None:
        return event
    if type(event) is Norms:
        event = event._replace(world=None)
    if type(event) is Hello:
        event = event._replace(clip=None)
    if type(event) is Norms:
        event = event._replace(groups=tuple(g._replace(fingerprint=None) for g in event.groups))
    if type(event) is Hello:
        event = event._replace(
            groups=tuple(g._replace(fingerprint=None, pieces=()) for g in event.groups)
        )
    return event


EVENTS = st.one_of(
    st.builds(
        Hello,
        **HEAD,
        world_size=st.integers(1, MAX_INT64),
        hostname=STRS,
        pid=COUNTS,
        library_version=STRS,
        torch_version=STRS,
        groups=st.lists(
            st.builds(
                GroupDecl,
                NAMES,
                st.sampled_from(ROLES),
                COUNTS,
                st.booleans(),
                st.none() | COUNTS,
                st.lists(COUNTS, max_size=4).map(tuple),  # the pieces (schema 3)
            ),
            max_size=4,
        ).map(tuple),
        clip=st.none() | st.floats(min_value=1e-300, max_value=1e300),
        **TAIL,
    ).map(schema_1),
    st.builds(
        Norms,
        **HEAD,
        step=COUNTS,
        skipped=st.booleans(),
        groups=st.lists(group_norms(), max_size=4).map(tuple),
        world=st.none() | st.integers(1, MAX_INT64),
        **TAIL,
    ).map(schema_1),
    st.builds(
        DeviceMismatch,
        **HEAD,
        kind=NAMES,
        group=STRS,
        devices=st.lists(NAMES, max_size=4).map(tuple),
        **TAIL,
    ),
    st.builds(
        IsolationViolation,
        **HEAD,
        step=COUNTS,
        group=NAMES,
        kind=NAMES,
        evidence=STRS,
        value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
        **TAIL,
    ),
    st.builds(
        Heartbeat, **HEAD, sent=COUNTS, dropped=COUNTS, queue_depth=COUNTS, errors=COUNTS, **TAIL
    ),
    st.builds(Goodbye, **HEAD, reason=STRS, **TAIL),
)


def to_wire(event) -> dict:
    out = {"v": 1 if event.seq is None else SCHEMA_VERSION, "event": KIND_OF[type(event)]}
    for name, value in zip(event._fields, event):
        if name in ("seq", "world", "clip") and event.seq is None:
            continue  # schema 1 has no such field
        if isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
            if name == "groups" and event.seq is None:  # nor fingerprints, nor pieces
                value = [v[: -2 if type(event) is Hello else -1] for v in value]
        out[name] = value
    return out


@st.composite
def near_valid_with_base(draw):
    """A valid event's wire map with one thing broken: a field replaced, dropped or added,
    or one entry of a nested array replaced; and the valid event it was made from."""
    base = draw(EVENTS)
    wire = to_wire(base)
    how = draw(st.sampled_from(["replace", "drop", "add", "nested"]))
    key = draw(st.sampled_from(sorted(wire)))
    if how == "replace":
        wire[key] = draw(OBJECTS)
    elif how == "drop":
        del wire[key]
    elif how == "add":
        wire[draw(KEYS)] = draw(OBJECTS)
    else:
        arrays = [k for k, v in wire.items() if isinstance(v, list) and v]
        if arrays:
            items = wire[draw(st.sampled_from(arrays))]
            i = draw(st.integers(0, len(items) - 1))
            if isinstance(items[i], list):
                items[i][draw(st.integers(0, len(items[i]) - 1))] = draw(LEAVES)
            else:
                items[i] = draw(LEAVES)
    return wire, base


def near_valid():
    return near_valid_with_base().map(lambda pair: pair[0])


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@FUZZ
@given(OBJECTS)
def test_arbitrary_msgpack_objects(obj):
    check_frame(pack(obj))


@FUZZ_SMALL
@given(st.lists(OBJECTS, min_size=1, max_size=3))
def test_arbitrary_batches(objs):
    check_frame(pack(objs))


@FUZZ
@given(near_valid())
def test_near_valid_events(wire):
    check_frame(pack(wire))


@FUZZ_SMALL
@given(st.lists(EVENTS, min_size=1, max_size=3), near_valid_with_base())
def test_batch_with_a_near_valid_event_is_all_or_nothing(events, pair):
    wire, base = pair
    # The valid events come from the same sender as the broken one (one run, rank, seq).
    events = [schema_1(e._replace(run=base.run, rank=base.rank, seq=base.seq)) for e in events]
    batch = [to_wire(e) for e in events] + [wire]
    result = check_frame(pack(batch))
    alone = check_frame(pack(wire))
    if alone == "ok":
        # The break left a valid event; it sinks the batch only if it changed the sender.
        got = decode(pack(wire))[0]
        if (got.seq is None) != (base.seq is None):
            alone = "version"
        elif got.seq is not None and (got.run, got.rank, got.seq) != (
            base.run,
            base.rank,
            base.seq,
        ):
            alone = "schema"
    # The valid events cannot change the outcome otherwise: the batch fails exactly when,
    # and with the reason that, the broken event fails on its own.
    assert result == alone


def one_sender(events):
    """A batch as one collector sends it: the first event's run, rank and seq on all."""
    first = events[0]
    return [schema_1(e._replace(run=first.run, rank=first.rank, seq=first.seq)) for e in events]


@FUZZ
@given(st.one_of(EVENTS, st.lists(EVENTS, min_size=1, max_size=5).map(one_sender)))
def test_valid_events_round_trip_exactly(events):
    expected = [events] if type(events) in KIND_OF else events
    got = decode(encode(events))
    assert_identical(got, expected)
    for event in got:
        for value in event:
            if type(value) is float:
                assert math.isfinite(value)


@FUZZ
@given(
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(1 << 63), MAX_INT64),
    st.integers(-3, 3) | st.sampled_from([MAX_INT64, MAX_INT64 + 1, True, 1.0, None]),
)
def test_a_group_sum_of_squares_is_accepted_exactly_when_valid(sq, nonfinite):
    # Finite and non-negative always; +Inf or NaN only beside a positive integer count;
    # -Inf and negatives never. Whatever fails, fails by value or schema, never else.
    group = ["g", "seed", 10, sq, nonfinite, False, True]
    frame = pack({**to_wire(NORMS._replace(groups=())), "groups": [group]})
    # Schema 3's entry: the same, then a fingerprint.
    numbered = pack({**to_wire(NORMS._replace(groups=(), seq=3)), "groups": [[*group, 7]]})
    assert check_frame(numbered) == check_frame(frame)  # the same rule in both versions
    count_ok = type(nonfinite) is int and 0 <= nonfinite <= MAX_INT64
    finite_ok = float(sq) >= 0.0 and float(sq) != math.inf
    nonfinite_ok = (sq == math.inf or sq != sq) and count_ok and nonfinite > 0
    want = "ok" if count_ok and (finite_ok or nonfinite_ok) else None
    got = check_frame(frame)
    if want == "ok":
        assert got == "ok"
        assert_identical(decode(frame)[0].groups[0].sq, float(sq))
    else:
        assert got in ("value", "schema"), got
        if not (finite_ok or nonfinite_ok):
            assert got == "value", (sq, nonfinite)  # the sum is checked before the count
