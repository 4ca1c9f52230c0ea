"""The wire contract: every event kind round-trips exactly in both schema versions (1:
no message number, 2: ``seq`` on every event), every bad message is rejected whole with
the right ``WireError.reason``.

Rejection cases are one table, so the last test can check that the reasons the decoder
produces are exactly ``esper_telemetry.REASONS``: a reason nobody can trigger, or a
trigger with an undeclared reason, fails it.
"""

from __future__ import annotations

import math

import msgpack
import pytest

import esper_telemetry
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
from esper_telemetry.defaults import (
    MAX_BATCH_EVENTS,
    MAX_DEVICES_PER_EVENT,
    MAX_GROUPS_PER_EVENT,
    MAX_MESSAGE_BYTES,
    MAX_PIECES_PER_GROUP,
    MAX_STRING_CHARS,
)
from esper_telemetry.events import KIND_OF

MAX_INT64 = (1 << 63) - 1

# --- sample events: every kind, every optional field both ways ------------------------

HELLO = Hello(
    run="run-1",
    rank=0,
    time=1700000000.25,
    world_size=2,
    hostname="node-a",
    pid=4242,
    library_version="0.1.0",
    torch_version="2.13.0",
    groups=(
        GroupDecl("host", "host", 1_000_000, False),
        GroupDecl("seed0", "seed", 1234, True),
        GroupDecl("adapter", "group", 0, False),
    ),
)
HELLO_NO_GROUPS = HELLO._replace(groups=(), hostname="", torch_version="")
NORMS = Norms(
    run="run-1",
    rank=1,
    time=1700000001.5,
    step=7,
    skipped=False,
    groups=(
        GroupNorm("host", "host", 1_000_000, 12.5, 0, False, False),
        GroupNorm("seed0", "seed", 1234, None, 0, False, True),  # no gradient
        GroupNorm("seed1", "seed", 1234, 0.0, 2, True, True),  # zero gradient
    ),
)
NORMS_SKIPPED = NORMS._replace(skipped=True, step=MAX_INT64, groups=())
# Non-finite sums travel as they are when the group counts non-finite gradients.
NORMS_NONFINITE = NORMS._replace(
    groups=(
        GroupNorm("host", "host", 1_000_000, math.nan, 1, False, False),
        GroupNorm("seed0", "seed", 1234, math.inf, 3, False, True),
        GroupNorm("seed1", "seed", 1234, math.inf, 1, True, True),
        GroupNorm("adapter", "group", 10, 4.0, 2, False, False),  # finite despite a count
    )
)
DEVICE = DeviceMismatch("run-1", 3, 2.0, "split", "host", ("cuda:0", "cpu"))
DEVICE_NO_GROUP = DeviceMismatch("run-1", 3, 2.0, "mixed", "", ())
VIOLATION = IsolationViolation(
    "run-1", 0, 3.0, 9, "seed0", "gradient", "seed0 received gradient", 0.75
)
VIOLATION_NONE = VIOLATION._replace(kind="structural", value=None)
VIOLATION_NEGATIVE = VIOLATION._replace(value=-1.5)  # value need only be finite
HEARTBEAT = Heartbeat("run-1", 0, 4.0, MAX_INT64, 0, 17, 1)
GOODBYE = Goodbye("run-1", 0, 0.0, "closed")
UNICODE = Goodbye("ran-\u00e9\u00df-\u65e5\u672c", 5, 5.5, "\U0001f600" * MAX_STRING_CHARS)
LONGEST = Goodbye("r" * MAX_STRING_CHARS, 0, 1.0, "x" * MAX_STRING_CHARS)

UNNUMBERED = [
    HELLO,
    HELLO_NO_GROUPS,
    NORMS,
    NORMS_SKIPPED,
    NORMS_NONFINITE,
    DEVICE,
    DEVICE_NO_GROUP,
    VIOLATION,
    VIOLATION_NONE,
    VIOLATION_NEGATIVE,
    HEARTBEAT,
    GOODBYE,
    UNICODE,
    LONGEST,
]
# The same events as a numbered (schema 2) sender sends them: 0, a middle value, the max.
NUMBERED = [e._replace(seq=(0, 12345, MAX_INT64)[i % 3]) for i, e in enumerate(UNNUMBERED)]
SINGLES = UNNUMBERED + NUMBERED


def assert_identical(got, want):
    """Equal, and of the same types all the way down (1 != 1.0 != True here)."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            assert_identical(g, w)
    elif isinstance(want, float):
        assert got == want or (math.isnan(got) and math.isnan(want)), (got, want)
        assert math.copysign(1.0, got) == math.copysign(1.0, want)
    else:
        assert got == want, (got, want)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def wire(event) -> dict:
    """The wire map of an event, built by hand (not by ``encode``) so cases can edit it:
    schema 1 without ``seq`` (nor ``world``, nor the groups' fingerprints) when the record
    has none, else the current schema with it."""
    out = {"v": 1 if event.seq is None else SCHEMA_VERSION, "event": KIND_OF[type(event)]}
    for name, value in zip(event._fields, event):
        if name in ("seq", "world", "clip") and event.seq is None:
            continue
        if isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
            if name == "groups" and event.seq is None:  # nor fingerprints, nor pieces
                value = [v[: -2 if type(event) is Hello else -1] for v in value]
        out[name] = value
    return out


def schema_2(event) -> dict:
    """The wire map of ``event`` (which has a ``seq``) as a schema 2 sender writes it: no
    world size, no group fingerprints."""
    out = edit(event, v=2)
    out.pop("world", None)
    out.pop("clip", None)
    if "groups" in out:
        out["groups"] = [g[: -2 if type(event) is Hello else -1] for g in out["groups"]]
    return out


def edit(record, **changes) -> dict:
    out = wire(record)
    out.update(changes)
    return out


def without(event, *names) -> dict:
    out = wire(event)
    for name in names:
        del out[name]
    return out


def v3_groups(*groups) -> dict:
    """``NORMS`` as a schema 3 wire map (numbered) carrying ``groups``."""
    return edit(NORMS._replace(seq=1), groups=list(groups))


def group_norm(**changes) -> list:
    """A group entry of schema 1 or 2 (``NORMS``'s): seven fields, no fingerprint."""
    return list(NORMS.groups[0]._replace(**changes))[:-1]


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "event", SINGLES, ids=lambda e: f"{type(e).__name__}-v{1 if e.seq is None else 2}"
)
def test_single_event_round_trips_exactly(event):
    data = encode(event)
    got = decode(data)
    assert type(got) is list
    assert len(got) == 1
    assert_identical(got[0], event)


def test_every_event_kind_is_covered():
    assert {type(e) for e in SINGLES} == set(KIND_OF)
    assert set(KIND_OF.values()) == {
        "hello",
        "norms",
        "device",
        "violation",
        "heartbeat",
        "goodbye",
    }


@pytest.mark.parametrize("maker", [list, tuple, iter], ids=["list", "tuple", "iterator"])
def test_batch_round_trips_in_order(maker):
    events = [NORMS, HELLO, GOODBYE, DEVICE, VIOLATION_NONE, HEARTBEAT, NORMS_SKIPPED]
    got = decode(encode(maker(events)))
    assert_identical(got, events)


@pytest.mark.parametrize("maker", [list, tuple, iter], ids=["list", "tuple", "iterator"])
def test_numbered_batch_round_trips_in_order(maker):
    # One collector's message: every event carries its run, rank and the message's number.
    events = [
        e._replace(run="run-1", rank=0, seq=41)
        for e in (NORMS, HELLO, GOODBYE, DEVICE, VIOLATION_NONE, HEARTBEAT)
    ]
    got = decode(encode(maker(events)))
    assert_identical(got, events)
    assert {e.seq for e in got} == {41}


def test_encode_numbers_a_message_whatever_its_records_hold():
    events = [NORMS._replace(rank=0), GOODBYE._replace(seq=5)]
    got = decode(encode(events, seq=8))
    assert_identical(got, [e._replace(seq=8) for e in events])
    assert msgpack.unpackb(encode(GOODBYE, seq=0))["v"] == 3
    assert_identical(decode(encode(GOODBYE, seq=0)), [GOODBYE._replace(seq=0)])


def test_norms_carry_the_world_size_from_schema_3_and_none_before():
    # Schema 3 writes it (a number or nil) and reads it back.
    for world in (4, None):
        raw = msgpack.unpackb(encode(NORMS._replace(world=world), seq=2))
        assert raw["v"] == 3 and raw["world"] == world
        assert_identical(
            decode(encode(NORMS._replace(world=world), seq=2)), [NORMS._replace(world=world, seq=2)]
        )
    # Schema 2 (a collector of the previous release) and 1 have none: decoded as None.
    v2 = schema_2(NORMS._replace(seq=2))
    assert_identical(decode(pack(v2)), [NORMS._replace(world=None, seq=2)])
    assert "world" not in wire(NORMS)
    assert_identical(decode(pack(wire(NORMS))), [NORMS])
    # Written without a message number it is schema 1: the world is not on that wire.
    assert "world" not in msgpack.unpackb(encode(NORMS._replace(world=4)))


def test_batch_of_one_is_an_array_not_a_map():
    data = encode([GOODBYE])
    assert type(msgpack.unpackb(data)) is list
    assert_identical(decode(data), [GOODBYE])


def test_single_event_wire_format_is_a_flat_map_with_version_and_kind():
    assert SCHEMA_VERSION == 3
    assert msgpack.unpackb(encode(GOODBYE._replace(seq=9))) == {
        "v": 3,
        "event": "goodbye",
        "run": "run-1",
        "rank": 0,
        "time": 0.0,
        "reason": "closed",
        "seq": 9,
    }
    # Without a message number it is what a schema 1 sender sends, byte for byte.
    assert msgpack.unpackb(encode(GOODBYE)) == {
        "v": 1,
        "event": "goodbye",
        "run": "run-1",
        "rank": 0,
        "time": 0.0,
        "reason": "closed",
    }
    assert msgpack.unpackb(encode(NORMS))["groups"][0] == [
        "host",
        "host",
        1_000_000,
        12.5,
        0,
        False,
        False,
    ]


def test_no_gradient_and_zero_gradient_stay_distinct():
    none_group, zero_group = NORMS.groups[1], NORMS.groups[2]
    raw = msgpack.unpackb(encode(NORMS))["groups"]
    assert raw[1][3] is None
    assert raw[2][3] == 0.0 and type(raw[2][3]) is float
    got = decode(encode(NORMS))[0].groups
    assert got[1].sq is None
    assert got[2].sq == 0.0 and type(got[2].sq) is float
    assert_identical(got[1], none_group)
    assert_identical(got[2], zero_group)


@pytest.mark.parametrize("sq", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("nonfinite", [1, 7, MAX_INT64])
def test_non_finite_sq_is_accepted_only_with_a_non_finite_count(sq, nonfinite):
    got = decode(pack(edit(NORMS, groups=[group_norm(sq=sq, nonfinite=nonfinite)])))[0]
    assert got.groups[0].nonfinite == nonfinite
    assert_identical(got.groups[0].sq, sq)
    # The same group with a count of 0 is a broken sender: rejected whole, by value.
    with pytest.raises(WireError) as caught:
        decode(pack(edit(NORMS, groups=[group_norm(sq=sq, nonfinite=0)])))
    assert caught.value.reason == "value"


def test_non_finite_sq_travels_as_a_msgpack_float():
    raw = msgpack.unpackb(encode(NORMS_NONFINITE))["groups"]
    assert math.isnan(raw[0][3]) and raw[1][3] == math.inf and raw[2][3] == math.inf


def test_finite_norms_stay_on_the_inline_path(monkeypatch):
    # The decoder's hottest loop: a valid finite group must not reach the field checks;
    # only the non-finite sum (rare) does, once per group that holds one.
    from esper_telemetry import codec

    calls = []
    real = codec._group_square
    monkeypatch.setattr(
        codec, "_group_square", lambda sq, nonfinite: calls.append(sq) or real(sq, nonfinite)
    )
    assert_identical(decode(encode(NORMS)), [NORMS])
    assert_identical(decode(encode(NORMS._replace(seq=5))), [NORMS._replace(seq=5)])
    assert calls == []
    assert_identical(decode(encode(NORMS_NONFINITE)), [NORMS_NONFINITE])
    assert len(calls) == 3 and all(not c < math.inf for c in calls)


def test_decoded_records_are_the_record_types():
    norms = decode(encode(NORMS))[0]
    assert type(norms) is Norms
    assert all(type(g) is GroupNorm for g in norms.groups)
    assert type(norms.groups) is tuple
    hello = decode(encode(HELLO))[0]
    assert all(type(g) is GroupDecl for g in hello.groups)
    assert type(decode(encode(DEVICE))[0].devices) is tuple


def test_integer_numbers_on_the_wire_decode_as_floats():
    # A sender may pack a whole-valued time or square as an integer.
    data = pack(edit(NORMS, time=5, groups=[group_norm(sq=3)]))
    got = decode(data)[0]
    assert got.time == 5.0 and type(got.time) is float
    assert got.groups[0].sq == 3.0 and type(got.groups[0].sq) is float
    got = decode(pack(edit(VIOLATION, value=-2)))[0]
    assert got.value == -2.0 and type(got.value) is float


@pytest.mark.parametrize("convert", [bytes, bytearray, memoryview])
def test_decode_accepts_any_bytes_like(convert):
    assert_identical(decode(convert(encode(HELLO))), [HELLO])


def test_limits_are_inclusive():
    assert len(decode(encode([GOODBYE] * MAX_BATCH_EVENTS))) == MAX_BATCH_EVENTS
    groups = tuple(
        GroupNorm(f"g{i}", "group", i, float(i), 0, False, False)
        for i in range(MAX_GROUPS_PER_EVENT)
    )
    assert_identical(decode(encode(NORMS._replace(groups=groups)))[0].groups, groups)
    decls = tuple(GroupDecl(f"g{i}", "seed", i, True) for i in range(MAX_GROUPS_PER_EVENT))
    assert_identical(decode(encode(HELLO._replace(groups=decls)))[0].groups, decls)
    devices = tuple(f"cuda:{i}" for i in range(MAX_DEVICES_PER_EVENT))
    assert decode(encode(DEVICE._replace(devices=devices)))[0].devices == devices
    assert decode(pack(edit(GOODBYE, rank=MAX_INT64)))[0].rank == MAX_INT64


# --- rejections ------------------------------------------------------------------------

GOOD = pack(wire(GOODBYE))
_BAD_UTF8 = b"\xa2\xff\xfe"  # fixstr of 2 bytes that are not UTF-8

CASES = {
    # limit
    "message over MAX_MESSAGE_BYTES": (b"\xc0" * (MAX_MESSAGE_BYTES + 1), "limit"),
    "valid event padded over the size limit": (
        pack(edit(GOODBYE, reason="x" * MAX_MESSAGE_BYTES)),
        "limit",
    ),
    "batch over MAX_BATCH_EVENTS": (pack([wire(GOODBYE)] * (MAX_BATCH_EVENTS + 1)), "limit"),
    "string one char too long": (pack(edit(GOODBYE, reason="x" * (MAX_STRING_CHARS + 1))), "limit"),
    "run name one char too long": (pack(edit(GOODBYE, run="r" * (MAX_STRING_CHARS + 1))), "limit"),
    "string over the unpacker's byte limit": (
        pack(edit(GOODBYE, reason="x" * (MAX_STRING_CHARS * 4 + 1))),
        "limit",
    ),
    "group name too long": (
        pack(edit(NORMS, groups=[group_norm(name="g" * (MAX_STRING_CHARS + 1))])),
        "limit",
    ),
    "too many group norms": (
        pack(edit(NORMS, groups=[group_norm()] * (MAX_GROUPS_PER_EVENT + 1))),
        "limit",
    ),
    "too many group declarations": (
        pack(edit(HELLO, groups=[list(HELLO.groups[0])] * (MAX_GROUPS_PER_EVENT + 1))),
        "limit",
    ),
    "too many devices": (
        pack(edit(DEVICE, devices=["cpu"] * (MAX_DEVICES_PER_EVENT + 1))),
        "limit",
    ),
    "map with too many keys": (pack({**wire(GOODBYE), **{f"k{i}": 0 for i in range(20)}}), "limit"),
    # malformed
    "not msgpack (reserved byte 0xc1)": (b"\xc1", "malformed"),
    "empty message": (b"", "malformed"),
    "truncated event": (GOOD[:-1], "malformed"),
    "trailing bytes": (GOOD + b"\x00", "malformed"),
    "two events back to back": (GOOD + GOOD, "malformed"),
    "bare int": (pack(5), "malformed"),
    "bare string": (pack("norms"), "malformed"),
    "nil": (pack(None), "malformed"),
    "empty batch": (pack([]), "malformed"),
    "batch holding a non-map": (pack([wire(GOODBYE), 5]), "malformed"),
    "bin where str": (pack(edit(GOODBYE, run=b"run-1")), "malformed"),
    "ext where str": (pack(edit(GOODBYE, reason=msgpack.ExtType(1, b"ab"))), "malformed"),
    "bin map key": (pack({**wire(GOODBYE), b"rank": 0}), "malformed"),
    "integer map key": (pack({**without(GOODBYE, "rank"), 1: 0}), "malformed"),
    "invalid UTF-8 string": (b"\x81\xa1v" + _BAD_UTF8, "malformed"),
    "not bytes at all": ("a str, not bytes", "malformed"),
    # version
    "missing v": (pack(without(GOODBYE, "v")), "version"),
    "v=4": (pack(edit(GOODBYE, v=4)), "version"),
    "v=4 with a seq": (pack(edit(GOODBYE, v=4, seq=1)), "version"),
    "batch mixing v=2 and v=3": (
        pack([edit(GOODBYE._replace(seq=3), v=2), wire(GOODBYE._replace(seq=3))]),
        "version",
    ),
    "v=0": (pack(edit(GOODBYE, v=0)), "version"),
    "v=True": (pack(edit(GOODBYE, v=True)), "version"),
    "v=1.0": (pack(edit(GOODBYE, v=1.0)), "version"),
    "v='1'": (pack(edit(GOODBYE, v="1")), "version"),
    "v=None": (pack(edit(GOODBYE, v=None)), "version"),
    # schema
    "numbered batch mixing versions": (
        pack([wire(GOODBYE._replace(seq=3)), wire(GOODBYE)]),
        "version",
    ),
    "unnumbered batch mixing versions": (
        pack([wire(GOODBYE), wire(GOODBYE._replace(seq=3))]),
        "version",
    ),
    "unknown event kind": (pack(edit(GOODBYE, event="farewell")), "schema"),
    "missing event kind": (pack(without(GOODBYE, "event")), "schema"),
    "event kind is a map": (pack(edit(GOODBYE, event={})), "schema"),
    "event kind is an array of maps": (pack(edit(GOODBYE, event=[{}])), "schema"),
    "event kind with wrong case": (pack(edit(GOODBYE, event="Goodbye")), "schema"),
    "missing field": (pack(without(GOODBYE, "rank")), "schema"),
    "missing nested-array field": (pack(without(NORMS, "groups")), "schema"),
    "extra field": (pack(edit(GOODBYE, extra=1)), "schema"),
    "field swapped for an unknown one": (pack({**without(GOODBYE, "rank"), "rnak": 0}), "schema"),
    "wrong type: rank as string": (pack(edit(GOODBYE, rank="0")), "schema"),
    "wrong type: time as string": (pack(edit(GOODBYE, time="1.0")), "schema"),
    "wrong type: rank as float": (pack(edit(GOODBYE, rank=0.0)), "schema"),
    "wrong type: groups as map": (pack(edit(NORMS, groups={"host": 1})), "schema"),
    "wrong type: sq as string": (pack(edit(NORMS, groups=[group_norm(sq="1.0")])), "schema"),
    "wrong type: devices entry as int": (pack(edit(DEVICE, devices=[0])), "schema"),
    "bool where int (rank)": (pack(edit(GOODBYE, rank=True)), "schema"),
    "bool where int (group params)": (
        pack(edit(NORMS, groups=[group_norm(params=True)])),
        "schema",
    ),
    "int where bool (skipped)": (pack(edit(NORMS, skipped=0)), "schema"),
    "int where bool (group isolated)": (
        pack(edit(NORMS, groups=[group_norm(isolated=1)])),
        "schema",
    ),
    "bool where number (time)": (pack(edit(GOODBYE, time=True)), "schema"),
    "unknown role in group norm": (pack(edit(NORMS, groups=[group_norm(role="boss")])), "schema"),
    "unknown role in group declaration": (
        pack(edit(HELLO, groups=[["host", "Host", 1, False]])),
        "schema",
    ),
    "group norm with 6 fields": (pack(edit(NORMS, groups=[group_norm()[:6]])), "schema"),
    # Schema 3: eight fields, the fingerprint an integer in 0..2**63-1 or nil.
    "schema 3 group norm without fingerprint": (pack(v3_groups(group_norm())), "schema"),
    "schema 2 group norm with a fingerprint": (
        pack(schema_2(NORMS._replace(seq=1)) | {"groups": [group_norm() + [5]]}),
        "schema",
    ),
    "negative fingerprint": (pack(v3_groups(group_norm() + [-1])), "value"),
    "fingerprint past int64": (pack(v3_groups(group_norm() + [MAX_INT64 + 1])), "value"),
    "fingerprint as a float": (pack(v3_groups(group_norm() + [5.0])), "schema"),
    "fingerprint as a string": (pack(v3_groups(group_norm() + ["ab"])), "schema"),
    "schema 3 declaration without fingerprint": (
        pack(edit(HELLO._replace(seq=1), groups=[["host", "host", 10, False]])),
        "schema",
    ),
    "schema 3 declaration without pieces": (
        pack(edit(HELLO._replace(seq=1), groups=[["host", "host", 10, False, 3]])),
        "schema",
    ),
    "negative fingerprint in a declaration": (
        pack(edit(HELLO._replace(seq=1), groups=[["host", "host", 10, False, -3, []]])),
        "value",
    ),
    "pieces not an array": (
        pack(edit(HELLO._replace(seq=1), groups=[["host", "host", 10, False, 3, 7]])),
        "schema",
    ),
    "a negative piece": (
        pack(edit(HELLO._replace(seq=1), groups=[["host", "host", 10, False, 3, [1, -2]]])),
        "value",
    ),
    "a piece as a float": (
        pack(edit(HELLO._replace(seq=1), groups=[["host", "host", 10, False, 3, [1.0]]])),
        "schema",
    ),
    "too many pieces": (
        pack(
            edit(
                HELLO._replace(seq=1),
                groups=[["host", "host", 10, False, 3, list(range(MAX_PIECES_PER_GROUP + 1))]],
            )
        ),
        "limit",
    ),
    "group norm as a map": (pack(edit(NORMS, groups=[NORMS.groups[0]._asdict()])), "schema"),
    "group declaration with 5 fields": (
        pack(edit(HELLO, groups=[list(HELLO.groups[0])[:4] + [0]])),  # schema 1: four
        "schema",
    ),
    "empty run name": (pack(edit(GOODBYE, run="")), "schema"),
    "v=2 without seq": (pack(edit(GOODBYE, v=2)), "schema"),
    "v=2 norms without seq": (pack(edit(NORMS, v=2)), "schema"),
    "v=1 with a seq": (pack(edit(GOODBYE, seq=1)), "schema"),
    "v=1 norms with a seq": (pack(edit(NORMS, seq=1)), "schema"),
    "v=3 without seq": (pack(edit(GOODBYE, v=3)), "schema"),
    "v=3 norms without world": (pack(without(NORMS._replace(seq=1), "world")), "schema"),
    "v=2 norms with a world": (pack(edit(NORMS._replace(seq=1), v=2, world=4)), "schema"),
    "v=1 norms with a world": (pack(edit(NORMS, world=4)), "schema"),
    "norms world as float": (pack(edit(NORMS._replace(seq=1), world=4.0)), "schema"),
    "norms world as bool": (pack(edit(NORMS._replace(seq=1), world=True)), "schema"),
    "hello world as string": (pack(edit(HELLO, world_size="4")), "schema"),
    "seq as float": (pack(edit(GOODBYE._replace(seq=1), seq=1.0)), "schema"),
    "seq as bool": (pack(edit(GOODBYE._replace(seq=1), seq=True)), "schema"),
    "seq nil in v=2": (pack(edit(GOODBYE._replace(seq=1), seq=None)), "schema"),
    "norms seq as string": (pack(edit(NORMS._replace(seq=1), seq="1")), "schema"),
    "numbered batch with two seqs": (
        pack([wire(GOODBYE._replace(seq=3)), wire(GOODBYE._replace(seq=4))]),
        "schema",
    ),
    "numbered batch with two runs": (
        pack([wire(GOODBYE._replace(seq=3)), wire(GOODBYE._replace(seq=3, run="other"))]),
        "schema",
    ),
    "numbered batch with two ranks": (
        pack([wire(NORMS._replace(seq=3, rank=0)), wire(GOODBYE._replace(seq=3, rank=1))]),
        "schema",
    ),
    "empty group name": (pack(edit(NORMS, groups=[group_norm(name="")])), "schema"),
    # value
    "NaN sq without a non-finite count": (
        pack(edit(NORMS, groups=[group_norm(sq=math.nan)])),
        "value",
    ),
    "Inf sq without a non-finite count": (
        pack(edit(NORMS, groups=[group_norm(sq=math.inf)])),
        "value",
    ),
    "-Inf sq even with a non-finite count": (
        pack(edit(NORMS, groups=[group_norm(sq=-math.inf, nonfinite=1)])),
        "value",
    ),
    "Inf sq with a negative non-finite count": (
        pack(edit(NORMS, groups=[group_norm(sq=math.inf, nonfinite=-1)])),
        "value",
    ),
    "Inf sq with a non-finite count that is a bool": (
        pack(edit(NORMS, groups=[group_norm(sq=math.inf, nonfinite=True)])),
        "value",
    ),
    "Inf sq with a non-finite count that is a float": (
        pack(edit(NORMS, groups=[group_norm(sq=math.inf, nonfinite=1.0)])),
        "value",
    ),
    "negative sq with a non-finite count": (
        pack(edit(NORMS, groups=[group_norm(sq=-1.0, nonfinite=1)])),
        "value",
    ),
    "negative sq": (pack(edit(NORMS, groups=[group_norm(sq=-1.0)])), "value"),
    "negative integer sq": (pack(edit(NORMS, groups=[group_norm(sq=-1)])), "value"),
    "negative count (rank)": (pack(edit(GOODBYE, rank=-1)), "value"),
    "negative seq": (pack(edit(GOODBYE._replace(seq=1), seq=-1)), "value"),
    "negative norms seq": (pack(edit(NORMS._replace(seq=1), seq=-1)), "value"),
    "norms world 0": (pack(edit(NORMS._replace(seq=1), world=0)), "value"),
    "norms world negative": (pack(edit(NORMS._replace(seq=1), world=-2)), "value"),
    "norms world past int64": (pack(edit(NORMS._replace(seq=1), world=1 << 63)), "value"),
    "seq over int64": (pack(edit(NORMS._replace(seq=1), seq=MAX_INT64 + 1)), "value"),
    "negative count (nonfinite)": (pack(edit(NORMS, groups=[group_norm(nonfinite=-1)])), "value"),
    "negative count (dropped)": (pack(edit(HEARTBEAT, dropped=-3)), "value"),
    "count over int64": (pack(edit(HEARTBEAT, sent=MAX_INT64 + 1)), "value"),
    "zero world size": (pack(edit(HELLO, world_size=0)), "value"),
    "NaN time": (pack(edit(GOODBYE, time=math.nan)), "value"),
    "Inf time": (pack(edit(GOODBYE, time=math.inf)), "value"),
    "negative time": (pack(edit(GOODBYE, time=-1.0)), "value"),
    "NaN violation value": (pack(edit(VIOLATION, value=math.nan)), "value"),
    "-Inf violation value": (pack(edit(VIOLATION, value=-math.inf)), "value"),
}


@pytest.mark.parametrize("data, reason", list(CASES.values()), ids=list(CASES))
def test_rejected_with_reason(data, reason):
    with pytest.raises(WireError) as caught:
        decode(data)
    assert caught.value.reason == reason, str(caught.value)
    assert caught.value.reason in REASONS


def test_cases_exercise_exactly_the_declared_reasons():
    assert {reason for _, reason in CASES.values()} == set(REASONS)
    assert esper_telemetry.REASONS is REASONS


def test_message_size_boundary():
    # Same bytes one shorter: now past the size check, rejected as trailing data instead.
    with pytest.raises(WireError) as caught:
        decode(b"\xc0" * MAX_MESSAGE_BYTES)
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(
    "bad, reason",
    [
        (edit(NORMS, groups=[group_norm(sq=math.nan)]), "value"),
        (edit(GOODBYE, v=4), "version"),
        (without(HEARTBEAT, "sent"), "schema"),
        (7, "malformed"),
    ],
)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_batch_with_one_bad_event_is_rejected_whole(bad, reason, position):
    batch = [wire(HELLO), wire(NORMS)]
    batch.insert(position, bad)
    with pytest.raises(WireError) as caught:
        decode(pack(batch))
    assert caught.value.reason == reason
    # The same batch without the bad event is fine: it was the one event that sank it.
    del batch[position]
    assert_identical(decode(pack(batch)), [HELLO, NORMS])


@pytest.mark.parametrize(
    "thing",
    [
        object(),
        5,
        None,
        "goodbye",
        b"\x80",
        {"v": 1, "event": "goodbye"},
        NORMS.groups[0],  # a record, but not an event
        HELLO.groups[0],
        [GOODBYE, "not an event"],
        [GOODBYE, NORMS.groups[0]],
        (GOODBYE, tuple(GOODBYE)),  # a plain tuple of the right values is not an event
    ],
    ids=lambda t: type(t).__name__,
)
def test_encode_rejects_non_events_with_type_error(thing):
    with pytest.raises(TypeError):
        encode(thing)


def test_wire_error_is_a_value_error_with_a_reason():
    assert issubclass(WireError, ValueError)
    with pytest.raises(ValueError) as caught:
        decode(pack(edit(GOODBYE, v=4)))
    err = caught.value
    assert isinstance(err, WireError)
    assert err.reason == "version"
    assert "3" in err.detail
    assert str(err).startswith("version")
    assert WireError("limit").reason == "limit" and str(WireError("limit")) == "limit"


def test_schema_3_carries_each_group_fingerprint_and_older_schemas_decode_none():
    fingerprinted = NORMS._replace(
        seq=4,
        world=2,
        groups=(
            GroupNorm("host", "host", 10, 2.0, 0, True, False, 0),
            GroupNorm("seed0", "seed", 3, None, 0, False, True, MAX_INT64),
            GroupNorm("seed1", "seed", 3, 1.0, 0, False, True, None),  # nil: not announced
        ),
    )
    raw = msgpack.unpackb(encode(fingerprinted))
    assert [g[-1] for g in raw["groups"]] == [0, MAX_INT64, None]
    assert_identical(decode(encode(fingerprinted)), [fingerprinted])
    pieces = tuple(range(MAX_PIECES_PER_GROUP - 1, -1, -1))  # the limit, inclusive
    hello = HELLO._replace(
        seq=0,
        groups=(
            GroupDecl("host", "host", 10, False, 123, (5, MAX_INT64)),
            GroupDecl("big", "group", 10, False, 0, pieces),
            GroupDecl("seed", "seed", 1, True, None),  # no fingerprint, no pieces
        ),
    )
    assert msgpack.unpackb(encode(hello))["groups"][0] == [
        "host",
        "host",
        10,
        False,
        123,
        [5, MAX_INT64],
    ]
    assert_identical(decode(encode(hello)), [hello])
    # Schema 1 has no fingerprint on its wire: written without, read back as None.
    assert all(
        len(g) == 7 for g in msgpack.unpackb(encode(fingerprinted._replace(seq=None)))["groups"]
    )
    assert [g.fingerprint for g in decode(encode(fingerprinted._replace(seq=None)))[0].groups] == [
        None
    ] * 3
    assert msgpack.unpackb(encode(hello._replace(seq=None)))["groups"][0] == [
        "host",
        "host",
        10,
        False,
    ]
    assert decode(encode(hello._replace(seq=None)))[0].groups[1].pieces == ()
    # Schema 2 (a collector of the previous release): seven fields, fingerprint None.
    v2 = decode(pack(schema_2(fingerprinted)))[0]
    assert [g.fingerprint for g in v2.groups] == [None] * 3
    assert v2.groups == tuple(g._replace(fingerprint=None) for g in fingerprinted.groups)
