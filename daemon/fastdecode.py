"""A faster strict decoder for the daemon's common message: one collector's ``Norms``.

``esper_telemetry.decode`` is the contract and stays the authority: this module only
answers for the messages it can vouch for, and says ``None`` for everything else, which
the receiver then gives to ``decode`` (for the events, or for the exact rejection reason).
It vouches for a message only when ``decode`` would accept it and return the same values:

- every event is a ``Norms`` of one schema version, from one sender (one run and rank, and
  of version 2 or 3 one ``seq``, of version 3 one ``world``), and every group has no
  non-finite gradient (``nonfinite`` 0) and a finite, non-negative sum of squares or nil:
  the captures of a healthy model, replicated or sharded, nearly all the traffic (the
  aggregator applies a message with a sharded group as records, but a 4,096-rank FSDP job
  sends nothing else, and decoding it here costs a fraction of ``decode``). Anything else
  (an exploding group, a ``Hello`` or ``Heartbeat`` in the batch, a schema 1 batch mixing
  runs) goes to ``decode`` whole;
- msgspec checks the types and ranges in C against the same limits as the codec's field
  checks (lengths in characters, counts in ``0..2**63-1``, roles by name);
- what msgspec reads differently from ``msgpack.unpackb`` cannot slip through: a map with
  a repeated key is read last-wins by both, but ``decode`` refuses any map of more than 16
  entries (``"limit"``) and msgspec does not count them. A single event must therefore be
  a fixmap (at most 15 entries), and a batch must be byte for byte the canonical encoding
  of what msgspec decoded (``esper_telemetry.encode`` writes exactly that), so every map
  in it has the 8, 9 or 10 keys of its version.

``decode_columns`` and ``columns`` (end of this module) read one sender's captures that
differ only in their time, step, values and message number by their byte layout, as
``Columns``, once the first is decoded and checked here; anything else is ``None``.

The events come back as msgspec ``Struct``s (``NormsV3``, ``NormsV2``, ``NormsV1``; the older
two with ``world`` None, as ``decode`` gives it) whose ``groups`` are tuples in
``GroupNorm``'s field order (of schema 3 with the fingerprint, before it without); the
aggregator applies them without building records (``Aggregator.apply_batch``). The wire
stays MessagePack: nothing here encodes.
"""

from __future__ import annotations

import struct
import sys
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

from esper_telemetry.defaults import (
    MAX_BATCH_EVENTS,
    MAX_GROUPS_PER_EVENT,
    MAX_MESSAGE_BYTES,
    MAX_STRING_CHARS,
)
from esper_telemetry.events import ROLES

__all__ = ["decode_norms", "NormsV1", "NormsV2", "NormsV3", "WIRE_NORMS"]

_Name = Annotated[str, Meta(min_length=1, max_length=MAX_STRING_CHARS)]
_Count = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
_Positive = Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
# Finite and non-negative: the bounds reject -Inf, +Inf and NaN (NaN fails every bound).
_Finite = Annotated[float, Meta(ge=0.0, le=sys.float_info.max)]
# A healthy group, in GroupNorm's field order:
# name, role, params, sq, nonfinite (0), sharded, isolated.
_Group = tuple[_Name, Literal[ROLES], _Count, _Finite | None, Literal[0], bool, bool]
_Groups = Annotated[tuple[_Group, ...], Meta(max_length=MAX_GROUPS_PER_EVENT)]
# Schema 3: the same, then the group's fingerprint (an integer or nil).
_Group3 = tuple[
    _Name, Literal[ROLES], _Count, _Finite | None, Literal[0], bool, bool, _Count | None
]
_Groups3 = Annotated[tuple[_Group3, ...], Meta(max_length=MAX_GROUPS_PER_EVENT)]


class NormsV3(Struct, forbid_unknown_fields=True, gc=False):
    """A schema 3 ``Norms`` as the wire has it (its keys in ``encode``'s order)."""

    v: Literal[3]
    event: Literal["norms"]
    run: _Name
    rank: _Count
    time: _Finite
    step: _Count
    skipped: bool
    groups: _Groups3
    world: _Positive | None
    seq: _Count


class NormsV2(Struct, forbid_unknown_fields=True, gc=False):
    """A schema 2 ``Norms`` as the wire has it (its keys in ``encode``'s order)."""

    v: Literal[2]
    event: Literal["norms"]
    run: _Name
    rank: _Count
    time: _Finite
    step: _Count
    skipped: bool
    groups: _Groups
    seq: _Count
    world: ClassVar[None] = None  # not on the wire before schema 3: not known


class NormsV1(Struct, forbid_unknown_fields=True, gc=False):
    """A schema 1 ``Norms`` (no message number) as the wire has it."""

    v: Literal[1]
    event: Literal["norms"]
    run: _Name
    rank: _Count
    time: _Finite
    step: _Count
    skipped: bool
    groups: _Groups
    seq: ClassVar[None] = None  # no message number: as a schema 1 record's ``seq``
    world: ClassVar[None] = None


# The wire types, for the aggregator to tell them from records.
WIRE_NORMS = (NormsV3, NormsV2, NormsV1)

_Batch3 = Annotated[tuple[NormsV3, ...], Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]
_Batch2 = Annotated[tuple[NormsV2, ...], Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]
_Batch1 = Annotated[tuple[NormsV1, ...], Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]
_single_v3 = msgspec.msgpack.Decoder(NormsV3).decode
_single_v2 = msgspec.msgpack.Decoder(NormsV2).decode
_single_v1 = msgspec.msgpack.Decoder(NormsV1).decode
_batch_v3 = msgspec.msgpack.Decoder(_Batch3).decode
_batch_v2 = msgspec.msgpack.Decoder(_Batch2).decode
_batch_v1 = msgspec.msgpack.Decoder(_Batch1).decode
# How encode starts a Norms map of each version: a fixmap of 10 (9, 8) keys, "v" first.
_HEAD_V3 = b"\x8a\xa1v\x03"
_HEAD_V2 = b"\x89\xa1v\x02"
_HEAD_V1 = b"\x88\xa1v\x01"


class _Canonical:
    """Re-encodes a decoded batch into one reused buffer, to compare it with the frame.

    One buffer for the process: the daemon decodes on its event loop's thread only.
    """

    __slots__ = ("encode_into", "buffer")

    def __init__(self) -> None:
        self.encode_into = msgspec.msgpack.Encoder().encode_into
        self.buffer = bytearray()

    def same(self, value: object, data: bytes) -> bool:
        buffer = self.buffer
        self.encode_into(value, buffer)
        same = buffer == data
        if len(buffer) > 65536:
            self.buffer = bytearray()  # do not keep a large frame's buffer for good
        return same


_canonical = _Canonical()


def decode_norms(
    data: bytes,
    # Bound as locals: this runs once per message received.
    _max: int = MAX_MESSAGE_BYTES,
    _v3: bytes = _HEAD_V3,
    _v2: bytes = _HEAD_V2,
    _v1: bytes = _HEAD_V1,
) -> tuple[NormsV3 | NormsV2 | NormsV1, ...] | None:
    """The events of one collector's healthy ``Norms`` message, or ``None``.

    ``None`` says nothing about validity: the message is for ``esper_telemetry.decode``.
    Never raises for any input.
    """
    # The first byte tells a single event from a batch, the first event's header its
    # version; a batch that mixes versions then fails that version's decoder and goes to
    # decode, which says "version".
    try:
        if len(data) > _max:
            return None
        head = data[0]
        # A single event as encode writes it: a fixmap of 10 (schema 3), 9 (schema 2) or 8
        # keys. A fixmap holds at most 15 entries, so no key can have been repeated past
        # decode's 16-entry limit (repeats read last-wins in both, and then a field is
        # missing).
        if head == 0x8A:
            return (_single_v3(data),)
        if head == 0x89:
            return (_single_v2(data),)
        if head == 0x88:
            return (_single_v1(data),)
        if head == 0xDC:
            at = 3
        elif 0x90 <= head <= 0x9F:
            at = 1
        else:
            return None
        if data.startswith(_v3, at):
            version = 3
            events = _batch_v3(data)
        elif data.startswith(_v2, at):
            version = 2
            events = _batch_v2(data)
        elif data.startswith(_v1, at):
            version = 1
            events = _batch_v1(data)
        else:
            return None
    except Exception:  # msgspec's errors, UnicodeDecodeError for a bad string, anything
        return None
    if head == 0x91:
        # A batch of one, as a collector sends a lone event: its only map is the fixmap
        # checked above, and one event is one sender.
        return events
    if not _canonical.same(events, data):
        return None
    first = events[0]
    run = first.run
    rank = first.rank
    if version == 3:
        seq = first.seq
        world = first.world
        for event in events:
            if event.seq != seq or event.rank != rank or event.run != run:
                return None  # decode: "schema" (events of one message differ)
            if event.world != world:
                return None  # valid, but the aggregator's fast path takes one world
    elif version == 2:
        seq = first.seq
        for event in events:
            if event.seq != seq or event.rank != rank or event.run != run:
                return None  # decode: "schema" (events of one message differ)
    else:
        for event in events:
            if event.rank != rank or event.run != run:
                return None  # valid for decode (schema 1 batches may mix senders)
    return events


# --- columns: one sender's captures, read by their fixed layout ----------------------------
#
# A collector's captures differ from one another only in their time, step and sums of
# squares (and, between messages, in the message number): every other byte repeats. Once
# one capture is decoded and checked (msgspec, as above), the rest of a run of same-sized
# captures is read by its layout: ``struct`` takes the values that vary out of every capture
# in one C pass, and the bytes that do not vary are compared with the checked capture's in
# a few C passes more. No object is built per capture: the aggregator takes columns.

_encode = msgspec.msgpack.encode
_MAX_COUNT = (1 << 63) - 1
_MAX_FLOAT = sys.float_info.max
# A msgpack unsigned integer by the length of its encoding: the struct code of its value,
# where the value starts, and its largest value here (a positive fixint is its own byte).
_UINT = {
    1: ("B", 0, 0x7F),
    2: ("B", 1, 0xFF),
    3: ("H", 1, 0xFFFF),
    5: ("I", 1, 0xFFFFFFFF),
    9: ("Q", 1, _MAX_COUNT),
}
_WIDTH = {"B": 1, "H": 2, "I": 4, "Q": 8, "d": 8}
_BATCH_OF_ONE = 0x91


class Columns:
    """Consecutive captures of one sender in columns; ``len`` is the number of captures.

    ``first`` is the first capture as decoded (its run, rank, world, skipped flag, and its
    groups' names, roles, counts, flags and fingerprints, which every capture repeats);
    ``steps``, ``times`` and ``sqs`` (one column per group, in ``first.groups``' order) hold
    every capture's values. ``seqs``: each capture's message number when each is a message
    of its own (coalesced by the receiver); None when they are one message's events, all
    numbered ``first.seq``. ``messages``: how many messages they came in.
    """

    __slots__ = ("first", "steps", "times", "sqs", "seqs", "messages")

    def __init__(self, first, steps, times, sqs, seqs) -> None:
        self.first = first
        self.steps = steps
        self.times = times
        self.sqs = sqs
        self.seqs = seqs
        self.messages = 1 if seqs is None else len(seqs)

    def __len__(self) -> int:
        return len(self.steps)

    def events(self) -> list[NormsV3 | NormsV2 | NormsV1]:
        """The captures as the fast decoder's structs, in order (for the general path)."""
        first = self.first
        replace = msgspec.structs.replace
        seqs = self.seqs if self.seqs is not None else [first.seq] * len(self.steps)
        rows = zip(*self.sqs) if self.sqs else [()] * len(self.steps)
        out = []
        for step, time_, seq, row in zip(self.steps, self.times, seqs, rows):
            groups = tuple(g[:3] + (q,) + g[4:] for g, q in zip(first.groups, row))
            changes = {"step": step, "time": time_, "groups": groups}
            if type(first) is not NormsV1:
                changes["seq"] = seq
            out.append(replace(first, **changes))
        return out


def _layout(first, lead: int, seq_varies: bool) -> tuple[list[tuple[int, str, int]], int]:
    """Where the values that vary sit in ``first``'s encoding, after ``lead`` bytes: the
    (offset, struct code, largest value; 0 for a float) of its time, step, each group's sum
    of squares (a nil one does not vary) and, when ``seq_varies``, its message number, in
    that order, which is the encoding's; and where the encoding ends."""
    at = lead + 1  # the fixmap's byte
    fields = []
    for name in type(first).__struct_fields__:
        at += len(_encode(name))
        value = getattr(first, name)
        size = len(_encode(value))
        if name == "time":
            fields.append((at + 1, "d", 0))
        elif name == "step" or (name == "seq" and seq_varies):
            code, skip, top = _UINT[size]
            fields.append((at + skip, code, top))
        elif name == "groups":
            g = at + (1 if len(value) < 16 else 3)
            for group in value:
                if group[3] is not None:
                    q = g + 1 + sum(len(_encode(v)) for v in group[:3])
                    fields.append((q + 1, "d", 0))
                g += len(_encode(group))
        at += size
    return fields, at


def columns(body: bytes, n: int, lead: int = 0, seq_varies: bool = False) -> Columns | None:
    """The ``n`` captures of ``body``, each ``lead`` bytes (a batch-of-one header) then one
    ``Norms`` map, all of one size, as columns; or None unless each is what
    ``decode_norms`` vouches for, with the first one's bytes but for its time, step, sums
    of squares and (``seq_varies``: each a message of its own) message number. Never
    raises."""
    try:
        size, rest = divmod(len(body), n)
        if rest or size <= lead or (lead and body[0] != _BATCH_OF_ONE):
            return None
        head = body[lead]
        if head == 0x8A:
            first = _single_v3(body[lead:size])
        elif head == 0x89:
            first = _single_v2(body[lead:size])
        elif head == 0x88:
            first = _single_v1(body[lead:size])
        else:
            return None
        # Canonical, as a batch must be (the layout below is msgspec's encoding).
        if _encode(first) != body[lead:size]:
            return None
        fields, end = _layout(first, lead, seq_varies)
        if end != size:
            return None
        # Every byte that does not vary is the first capture's: zero those that do, in
        # every capture at once (a strided slice per byte), and compare.
        copy = bytearray(body)
        zeros = bytes(n)
        pattern = ">"
        at = 0
        for offset, code, _top in fields:
            width = _WIDTH[code]
            for k in range(offset, offset + width):
                copy[k::size] = zeros
            pattern += f"{offset - at}x{code}" if offset > at else code
            at = offset + width
        if copy != copy[:size] * n:
            return None
        pattern += f"{size - at}x" if size > at else ""
        values = list(zip(*struct.iter_unpack(pattern, body)))
        # The fields' checks for every capture: time and sums of squares finite and not
        # negative, the integers within their range. A NaN makes the sum NaN; without
        # one, ``max`` and ``min`` are exact (a sum past the float range is not an Inf).
        for (_offset, code, top), column in zip(fields, values):
            if code == "d":
                total = sum(column)
                if total - total != 0.0 and (total != total or max(column) > _MAX_FLOAT):
                    return None
                if min(column) < 0.0:
                    return None
            elif max(column) > top:
                return None
    except Exception:  # msgspec's errors, anything: the general path decides
        return None
    steps = values[1]
    sqs = []
    k = 2
    for group in first.groups:
        if group[3] is None:
            sqs.append((None,) * n)
        else:
            sqs.append(values[k])
            k += 1
    if not seq_varies:
        seqs = None
    elif k < len(values):
        seqs = values[k]
    else:
        seqs = (None,) * n  # schema 1: messages without a number
    return Columns(first, steps, values[0], sqs, seqs)


def decode_columns(data: bytes, _max: int = MAX_MESSAGE_BYTES) -> Columns | None:
    """A batch ``Norms`` message of one sender as columns (``columns``), or None: then it is
    for ``decode_norms``. Never raises."""
    if len(data) > _max or len(data) < 3:
        return None
    head = data[0]
    if head == 0xDC:
        n = (data[1] << 8) | data[2]
        at = 3
    elif 0x92 <= head <= 0x9F:
        n = head & 0x0F
        at = 1
    else:
        return None
    if n > MAX_BATCH_EVENTS:
        return None
    return columns(data[at:], n)
