"""A faster strict decoder for the daemon's common message: one collector's ``Norms``.

``esper_telemetry.decode`` is the contract and stays the authority: this module only
answers for the messages it can vouch for, and says ``None`` for everything else, which
the receiver then gives to ``decode`` (for the events, or for the exact rejection reason).
It vouches for a message only when ``decode`` would accept it and return the same values:

- every event is a ``Norms`` of one schema version, from one sender (one run and rank, and
  of version 2 one ``seq``), and every group is replicated (``sharded`` false) with no
  non-finite gradient (``nonfinite`` 0) and a finite, non-negative sum of squares or nil:
  the captures of a healthy replicated model, nearly all the traffic. Anything else
  (a sharded group, an exploding one, a ``Hello`` or ``Heartbeat`` in the batch, a schema 1
  batch mixing runs) goes to ``decode`` whole;
- msgspec checks the types and ranges in C against the same limits as the codec's field
  checks (lengths in characters, counts in ``0..2**63-1``, roles by name);
- what msgspec reads differently from ``msgpack.unpackb`` cannot slip through: a map with
  a repeated key is read last-wins by both, but ``decode`` refuses any map of more than 16
  entries (``"limit"``) and msgspec does not count them. A single event must therefore be
  a fixmap (at most 15 entries), and a batch must be byte for byte the canonical encoding
  of what msgspec decoded (``esper_telemetry.encode`` writes exactly that), so every map
  in it has the 8 or 9 keys of its version.

The events come back as msgspec ``Struct``s (``NormsV2``, ``NormsV1``) whose ``groups`` are
tuples in ``GroupNorm``'s field order; the aggregator applies them without building
records (``Aggregator.apply_batch``). The wire stays MessagePack: nothing here encodes.
"""

from __future__ import annotations

import sys
from typing import Annotated, ClassVar, Literal, Optional, Tuple, Union

import msgspec
from msgspec import Meta, Struct

from esper_telemetry.defaults import (
    MAX_BATCH_EVENTS,
    MAX_GROUPS_PER_EVENT,
    MAX_MESSAGE_BYTES,
    MAX_STRING_CHARS,
)
from esper_telemetry.events import ROLES

__all__ = ["decode_norms", "NormsV1", "NormsV2", "WIRE_NORMS"]

_Name = Annotated[str, Meta(min_length=1, max_length=MAX_STRING_CHARS)]
_Count = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
# Finite and non-negative: the bounds reject -Inf, +Inf and NaN (NaN fails every bound).
_Finite = Annotated[float, Meta(ge=0.0, le=sys.float_info.max)]
# A healthy replicated group, in GroupNorm's field order:
# name, role, params, sq, nonfinite (0), sharded (false), isolated.
_Group = Tuple[_Name, Literal[ROLES], _Count, Optional[_Finite], Literal[0], Literal[False],
               bool]
_Groups = Annotated[Tuple[_Group, ...], Meta(max_length=MAX_GROUPS_PER_EVENT)]


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


# The two wire types, for the aggregator to tell them from records.
WIRE_NORMS = (NormsV2, NormsV1)

_Batch2 = Annotated[Tuple[NormsV2, ...], Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]
_Batch1 = Annotated[Tuple[NormsV1, ...], Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]
_decode_v2 = msgspec.msgpack.Decoder(Union[NormsV2, _Batch2]).decode
_decode_v1 = msgspec.msgpack.Decoder(Union[NormsV1, _Batch1]).decode


class _Canonical:
    """Re-encodes a decoded batch into one reused buffer, to compare it with the frame."""

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


def decode_norms(data: bytes) -> Optional[Tuple[Union[NormsV2, NormsV1], ...]]:
    """The events of one collector's healthy ``Norms`` message, or ``None``.

    ``None`` says nothing about validity: the message is for ``esper_telemetry.decode``.
    Never raises for any input.
    """
    n = len(data)
    if n < 4 or n > MAX_MESSAGE_BYTES or type(data) is not bytes:
        return None
    head = data[0]
    # Where the first event's map starts: a single event (a fixmap), or a batch of up to
    # 15 (fixarray) or of up to 65,535 events (array 16).
    if 0x80 <= head <= 0x8F:
        at = 0
    elif 0x90 <= head <= 0x9F:
        at = 1
    elif head == 0xDC:
        at = 3
    else:
        return None
    # encode writes "v" first: the first event's version picks the decoder; a batch that
    # mixes versions then fails it and goes to decode, which says "version".
    if n < at + 4 or data[at + 1:at + 3] != b"\xa1v":
        return None
    version = data[at + 3]
    try:
        if version == 2:
            value = _decode_v2(data)
        elif version == 1:
            value = _decode_v1(data)
        else:
            return None
    except Exception:  # msgspec's errors, and UnicodeDecodeError for a bad string
        return None
    if type(value) is not tuple:
        # A single event: a fixmap (checked above), so no key can have been repeated past
        # decode's 16-entry limit.
        return (value,) if at == 0 else None
    if at == 0 or not _canonical.same(value, data):
        return None
    first = value[0]
    run = first.run
    rank = first.rank
    if version == 2:
        seq = first.seq
        for event in value:
            if event.seq != seq or event.rank != rank or event.run != run:
                return None  # decode: "schema" (events of one message differ)
    else:
        for event in value:
            if event.rank != rank or event.run != run:
                return None  # valid for decode (schema 1 batches may mix senders)
    return value
