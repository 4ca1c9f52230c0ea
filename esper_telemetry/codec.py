"""MessagePack encoding of events: two pure functions and one exception.

One ZeroMQ message carries one event (a map) or a batch (an array of maps). Each map holds
``"v"`` (the schema version), ``"event"`` (the wire kind) and the record's fields by name;
nested group records travel as arrays in field order.

Decoding is strict and bounded, because the daemon takes bytes from anyone who can reach
its socket: a message is either decoded whole into valid records or rejected whole with a
``WireError`` whose ``reason`` is a short stable token, never half-applied and never any
other exception. The reasons:

- ``"limit"``: the message, a batch, a string, a map or a list is larger than allowed;
- ``"malformed"``: not MessagePack, trailing bytes, or not a map or array of maps;
- ``"version"``: an event without a schema version, or with one this side does not know;
- ``"schema"``: an unknown event kind, missing or unknown fields, a wrong type;
- ``"value"``: a number out of range (non-finite, negative where a count or square is).

Three schema versions are decoded. Version 1 is what senders without message numbers
send; version 2 adds ``seq``, the number of the carrying message, to every event, and a
message of version 2 or 3 comes from one collector: every event of it carries the same run,
rank and ``seq`` (``"schema"`` otherwise), and a batch never mixes versions (``"version"``).
Version 3 adds ``world`` to ``Norms`` (a positive integer, or nil: not known), ``clip`` to
``Hello`` (the job's clipping threshold: a finite number > 0, or nil), and a
``fingerprint`` to every group entry and declaration (an integer in ``0..2**63-1``, or nil)
and to every declaration its ``pieces`` (at most ``MAX_PIECES_PER_GROUP`` such integers);
decoded from version 1 or 2, they are ``None`` (``pieces`` empty). ``encode`` writes a
record whose ``seq`` is ``None`` as version 1 (without them) and any other as version 3.

One number may be non-finite: a group's sum of squares, +Inf or NaN (never -Inf), and only
when the same group counts non-finite gradients (``nonfinite > 0``). An exploding gradient
is reported as what it is; a non-finite sum without that count is a broken sender.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack

from .defaults import (
    MAX_BATCH_EVENTS,
    MAX_DEVICES_PER_EVENT,
    MAX_GROUPS_PER_EVENT,
    MAX_MESSAGE_BYTES,
    MAX_PIECES_PER_GROUP,
    MAX_STRING_CHARS,
)
from .events import (
    KIND_OF,
    ROLES,
    SCHEMA_VERSION,
    SCHEMA_VERSIONS,
    DeviceMismatch,
    Event,
    Goodbye,
    GroupDecl,
    GroupNorm,
    Heartbeat,
    Hello,
    IsolationViolation,
    Norms,
)

__all__ = ["WireError", "encode", "decode", "REASONS"]

REASONS = ("limit", "malformed", "version", "schema", "value")

_MAX_INT = (1 << 63) - 1
# Upper bound on any map in a message: the largest event has eleven keys (seq, v, event).
_MAX_MAP_LEN = 16
_MAX_ARRAY_LEN = max(MAX_BATCH_EVENTS, MAX_GROUPS_PER_EVENT, MAX_DEVICES_PER_EVENT)


class WireError(ValueError):
    """A message that was rejected whole; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode(events: Event | Iterable[Event], seq: int | None = None) -> bytes:
    """Pack one event, or a batch of events, into one message.

    A single event packs as a map, a batch (any iterable of events) as an array of maps.
    ``seq``, when given, is the message's number: every event is written with it (schema
    2), whatever its record holds; otherwise each record's own ``seq`` is written.
    Raises ``TypeError`` for anything that is not an event record.
    """
    if type(events) in KIND_OF:
        return msgpack.packb(_to_wire(events, seq), use_bin_type=True)
    return msgpack.packb([_to_wire(e, seq) for e in events], use_bin_type=True)


def _to_wire(event: Event, seq: int | None = None) -> dict[str, Any]:
    kind = KIND_OF.get(type(event))
    if kind is None:
        raise TypeError(f"not an esper_telemetry event: {type(event).__name__}")
    if seq is not None:
        wire = {"v": SCHEMA_VERSION, "event": kind}
        wire.update(zip(event._fields[:-1], event))
        wire["seq"] = seq
    elif event[-1] is None:  # no message number: schema version 1, without the field
        wire: dict[str, Any] = {"v": 1, "event": kind}
        wire.update(zip(event._fields[:-1], event))
        if kind == "norms":
            del wire["world"]  # schema 3's field
        elif kind == "hello":
            del wire["clip"]  # schema 3's field
        if kind == "norms":  # and each group's fingerprint
            wire["groups"] = [g[:-1] for g in event.groups]  # type: ignore[union-attr]
        elif kind == "hello":  # and each declaration's fingerprint and pieces
            wire["groups"] = [g[:-2] for g in event.groups]  # type: ignore[union-attr]
    else:
        wire = {"v": SCHEMA_VERSION, "event": kind}
        wire.update(zip(event._fields, event))
    return wire


def decode(data: bytes) -> list[Event]:
    """Unpack one message into a list of events, or raise ``WireError`` and apply nothing."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError("limit", f"message of {len(data)} bytes")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=MAX_STRING_CHARS * 4,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=_MAX_ARRAY_LEN,
            max_map_len=_MAX_MAP_LEN,
        )
    except ValueError as exc:
        # msgpack reports its length limits as ValueError("... exceeds max_..._len(...)").
        # Bin and ext are not on this wire at all (their limit is 0): a type, not a size.
        message = str(exc)
        oversized = "exceeds max" in message
        if oversized and "max_bin_len" not in message and "max_ext_len" not in message:
            raise WireError("limit", message) from None
        raise WireError("malformed", str(exc) or type(exc).__name__) from None
    except Exception as exc:  # FormatError, StackError, unhashable keys, bad UTF-8, ...
        raise WireError("malformed", str(exc) or type(exc).__name__) from None

    if type(obj) is dict:
        return [_from_wire(obj)]
    if type(obj) is tuple:
        if not obj:
            raise WireError("malformed", "empty batch")
        if len(obj) > MAX_BATCH_EVENTS:
            raise WireError("limit", f"batch of {len(obj)} events")
        events = [_from_wire(item) for item in obj]
        _one_sender(events)
        version = obj[0]["v"]  # every item is a map with a known version by now
        for item in obj:
            if item["v"] != version:
                raise WireError("version", "a batch mixes schema versions")
        return events
    raise WireError("malformed", f"message is a {type(obj).__name__}, not a map or array")


# --- field checks -------------------------------------------------------------------
# Each takes the field's wire value and returns the record's value or raises WireError.
# They are small and flat on purpose: the daemon runs them for every field it receives.


def _str(value: Any) -> str:
    if type(value) is not str:
        raise WireError("schema", f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_STRING_CHARS:
        raise WireError("limit", f"string of {len(value)} characters")
    return value


def _name(value: Any) -> str:
    if type(value) is not str or not value:
        raise WireError("schema", "expected a non-empty string")
    if len(value) > MAX_STRING_CHARS:
        raise WireError("limit", f"string of {len(value)} characters")
    return value


def _count(value: Any) -> int:
    if type(value) is not int:
        raise WireError("schema", f"expected an integer, got {type(value).__name__}")
    if value < 0 or value > _MAX_INT:
        raise WireError("value", f"count out of range: {value}")
    return value


def _positive(value: Any) -> int:
    if _count(value) == 0:
        raise WireError("value", "expected a positive integer")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise WireError("schema", f"expected a boolean, got {type(value).__name__}")
    return value


def _time(value: Any) -> float:
    if type(value) is float or type(value) is int:
        value = float(value)
        if math.isfinite(value) and value >= 0.0:
            return value
        raise WireError("value", f"time out of range: {value}")
    raise WireError("schema", f"expected a number, got {type(value).__name__}")


def _group_square(value: Any, nonfinite: Any) -> float | None:
    """A group's sum of squares: finite and non-negative, or None for 'no gradient'; +Inf
    or NaN only when ``nonfinite`` (the group's wire value, checked on its own later) is a
    positive integer."""
    if value is None:
        return None
    if type(value) is float or type(value) is int:
        value = float(value)
        if value >= 0.0 and value != math.inf:  # NaN fails the first test
            return value
        if (value == math.inf or value != value) and type(nonfinite) is int and nonfinite > 0:
            return value
        raise WireError(
            "value", f"sum of squares out of range: {value} (non-finite count {nonfinite!r})"
        )
    raise WireError("schema", f"expected a number or nil, got {type(value).__name__}")


def _opt_positive(value: Any) -> int | None:
    if value is None:
        return None
    return _positive(value)


def _opt_positive_finite(value: Any) -> float | None:
    value = _opt_finite(value)
    if value is not None and value <= 0:
        raise WireError("value", f"expected a number > 0, got {value}")
    return value


def _opt_finite(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) is float or type(value) is int:
        value = float(value)
        if math.isfinite(value):
            return value
        raise WireError("value", f"non-finite number: {value}")
    raise WireError("schema", f"expected a number or nil, got {type(value).__name__}")


def _role(value: Any) -> str:
    if type(value) is not str or value not in ROLES:
        raise WireError("schema", f"unknown role {value!r}")
    return value


def _array(value: Any, limit: int) -> tuple[Any, ...]:
    if type(value) is not tuple:
        raise WireError("schema", f"expected an array, got {type(value).__name__}")
    if len(value) > limit:
        raise WireError("limit", f"array of {len(value)} items")
    return value


_ROLE_SET = frozenset(ROLES)
_new_group_norm = tuple.__new__


def _group_norms(
    value: Any,
    # Bound as locals: this is the daemon's hottest loop and global lookups add up.
    _str: type = str,
    _int: type = int,
    _float: type = float,
    _bool_t: type = bool,
    _tuple: type = tuple,
    _roles: frozenset = _ROLE_SET,
    _maxs: int = MAX_STRING_CHARS,
    _maxi: int = _MAX_INT,
    _inf: float = math.inf,
    _maxg: int = MAX_GROUPS_PER_EVENT,
) -> tuple[GroupNorm, ...]:
    """Schema 3 group entries: ``GroupNorm``'s eight fields, the fingerprint last."""
    # One pass of inline type tests per group, falling back to the field checks (for a
    # precise reason, or for a non-finite sum of squares: rare, and judged there against
    # the group's non-finite count) only when something is unusual.
    if type(value) is not _tuple or len(value) > _maxg:
        _array(value, _maxg)  # raises the precise WireError
    out = []
    append = out.append
    for item in value:
        if type(item) is _tuple and len(item) == 8:
            name, role, params, sq, nonfinite, sharded, isolated, fingerprint = item
            if (
                type(name) is _str is type(role)
                and 0 < len(name) <= _maxs
                and role in _roles
                and type(params) is _int is type(nonfinite)
                and 0 <= params <= _maxi
                and 0 <= nonfinite <= _maxi
                and type(sharded) is _bool_t is type(isolated)
                and (sq is None or (type(sq) is _float and 0.0 <= sq < _inf))
                and (
                    fingerprint is None or (type(fingerprint) is _int and 0 <= fingerprint <= _maxi)
                )
            ):
                append(_new_group_norm(GroupNorm, item))
                continue
            append(_checked_group_norm(item[:7], _opt_count(fingerprint)))
        else:
            raise WireError("schema", "a group norm is an array of 8 fields")
    return tuple(out)


def _group_norms_v2(
    value: Any,
    _str: type = str,
    _int: type = int,
    _float: type = float,
    _bool_t: type = bool,
    _tuple: type = tuple,
    _roles: frozenset = _ROLE_SET,
    _maxs: int = MAX_STRING_CHARS,
    _maxi: int = _MAX_INT,
    _inf: float = math.inf,
    _maxg: int = MAX_GROUPS_PER_EVENT,
    _no_fingerprint: tuple = (None,),
) -> tuple[GroupNorm, ...]:
    """Schema 1 and 2 group entries: seven fields, no fingerprint (``None``)."""
    if type(value) is not _tuple or len(value) > _maxg:
        _array(value, _maxg)  # raises the precise WireError
    out = []
    append = out.append
    for item in value:
        if type(item) is _tuple and len(item) == 7:
            name, role, params, sq, nonfinite, sharded, isolated = item
            if (
                type(name) is _str is type(role)
                and 0 < len(name) <= _maxs
                and role in _roles
                and type(params) is _int is type(nonfinite)
                and 0 <= params <= _maxi
                and 0 <= nonfinite <= _maxi
                and type(sharded) is _bool_t is type(isolated)
                and (sq is None or (type(sq) is _float and 0.0 <= sq < _inf))
            ):
                append(_new_group_norm(GroupNorm, item + _no_fingerprint))
                continue
            append(_checked_group_norm(item, None))
        else:
            raise WireError("schema", "a group norm is an array of 7 fields")
    return tuple(out)


def _checked_group_norm(item: tuple, fingerprint: int | None) -> GroupNorm:
    name, role, params, sq, nonfinite, sharded, isolated = item
    return GroupNorm(
        _name(name),
        _role(role),
        _count(params),
        _group_square(sq, nonfinite),
        _count(nonfinite),
        _bool(sharded),
        _bool(isolated),
        fingerprint,
    )


def _opt_count(value: Any) -> int | None:
    return None if value is None else _count(value)


def _group_decls(value: Any) -> tuple[GroupDecl, ...]:
    """Schema 3 group declarations: six fields, the fingerprint and the pieces last."""
    out = []
    for item in _array(value, MAX_GROUPS_PER_EVENT):
        if type(item) is not tuple or len(item) != 6:
            raise WireError("schema", "a group declaration is an array of 6 fields")
        name, role, params, isolated, fingerprint, pieces = item
        out.append(
            GroupDecl(
                _name(name),
                _role(role),
                _count(params),
                _bool(isolated),
                _opt_count(fingerprint),
                tuple(map(_count, _array(pieces, MAX_PIECES_PER_GROUP))),
            )
        )
    return tuple(out)


def _group_decls_v2(value: Any) -> tuple[GroupDecl, ...]:
    """Schema 1 and 2 group declarations: four fields, no fingerprint (``None``)."""
    out = []
    for item in _array(value, MAX_GROUPS_PER_EVENT):
        if type(item) is not tuple or len(item) != 4:
            raise WireError("schema", "a group declaration is an array of 4 fields")
        name, role, params, isolated = item
        out.append(GroupDecl(_name(name), _role(role), _count(params), _bool(isolated)))
    return tuple(out)


def _devices(value: Any) -> tuple[str, ...]:
    return tuple(_name(d) for d in _array(value, MAX_DEVICES_PER_EVENT))


def _one_sender(events: list[Event]) -> None:
    """A batch is one version; of version 2 or 3, one collector's message: one run, rank, seq."""
    first = events[0]
    seq = first[-1]
    if seq is None:
        for e in events:
            if e[-1] is not None:
                raise WireError("version", "a batch mixes schema versions 1 and 2")
        return
    run, rank = first[0], first[1]
    for e in events:
        if e[-1] != seq or e[0] != run or e[1] != rank:
            if e[-1] is None:
                raise WireError("version", "a batch mixes schema versions 1 and 2")
            raise WireError("schema", "events of one message differ in run, rank or seq")


_Check = Callable[[Any], Any]
_COMMON: Sequence[tuple[str, _Check]] = (("run", _name), ("rank", _count), ("time", _time))

_SPECS_V1: dict[str, tuple[type, tuple[tuple[str, _Check], ...]]] = {
    "hello": (
        Hello,
        (
            *_COMMON,
            ("world_size", _positive),
            ("hostname", _str),
            ("pid", _count),
            ("library_version", _str),
            ("torch_version", _str),
            ("groups", _group_decls_v2),
        ),
    ),
    "norms": (
        Norms,
        (
            *_COMMON,
            ("step", _count),
            ("skipped", _bool),
            ("groups", _group_norms_v2),
        ),
    ),
    "device": (
        DeviceMismatch,
        (
            *_COMMON,
            ("kind", _name),
            ("group", _str),
            ("devices", _devices),
        ),
    ),
    "violation": (
        IsolationViolation,
        (
            *_COMMON,
            ("step", _count),
            ("group", _name),
            ("kind", _name),
            ("evidence", _str),
            ("value", _opt_finite),
        ),
    ),
    "heartbeat": (
        Heartbeat,
        (
            *_COMMON,
            ("sent", _count),
            ("dropped", _count),
            ("queue_depth", _count),
            ("errors", _count),
        ),
    ),
    "goodbye": (Goodbye, (*_COMMON, ("reason", _str))),
}
# Version 2: the same fields, then the carrying message's number. Version 3: Norms carries
# the world size before it.
_SPECS_V2 = {
    kind: (record, (*fields, ("seq", _count))) for kind, (record, fields) in _SPECS_V1.items()
}
# Version 3 also gives every group entry and declaration its fingerprint.
_V3_GROUPS = {"groups": _group_norms}
_V3_DECLS = {"groups": _group_decls}
_SPECS_V3 = {
    **_SPECS_V2,
    "hello": (
        Hello,
        (
            *((f, _V3_DECLS.get(f, check)) for f, check in _SPECS_V1["hello"][1]),
            ("clip", _opt_positive_finite),
            ("seq", _count),
        ),
    ),
    "norms": (
        Norms,
        (
            *((f, _V3_GROUPS.get(f, check)) for f, check in _SPECS_V1["norms"][1]),
            ("world", _opt_positive),
            ("seq", _count),
        ),
    ),
}
_SPECS: dict[int, dict[str, tuple[type, tuple[tuple[str, _Check], ...]]]] = {
    1: _SPECS_V1,
    2: _SPECS_V2,
    3: _SPECS_V3,
}


_new_record = tuple.__new__
_INF = math.inf


_NORMS_KEYS = ("v", "event", "run", "rank", "time", "step", "skipped", "groups", "world", "seq")
_NORMS_KEYS_V2 = (*_NORMS_KEYS[:-2], "seq")
_NORMS_KEYS_V1 = _NORMS_KEYS[:-2]


def _from_wire(
    obj: Any,
    # Bound as locals (see _group_norms): this runs once per event received.
    _dict: type = dict,
    _tuple: type = tuple,
    _str: type = str,
    _int: type = int,
    _float: type = float,
    _bool: type = bool,
    _keys: tuple = _NORMS_KEYS,
    _keys_v2: tuple = _NORMS_KEYS_V2,
    _keys_v1: tuple = _NORMS_KEYS_V1,
    _version: int = SCHEMA_VERSION,
    _maxs: int = MAX_STRING_CHARS,
    _maxi: int = _MAX_INT,
    _inf: float = _INF,
    _norms: type = Norms,
    _groups_v3: Callable[[Any], tuple[GroupNorm, ...]] = _group_norms,
    _groups_v2: Callable[[Any], tuple[GroupNorm, ...]] = _group_norms_v2,
) -> Event:
    # Fast path for the event that dominates the traffic: a Norms map with its keys in the
    # order ``encode`` writes them (any version). Every test is the same as the field
    # checks'; on any doubt it falls through to the general path, which raises the precise
    # WireError.
    if type(obj) is _dict:
        n = len(obj)
        if n == 10 and _tuple(obj) == _keys:
            version, event, run, rank, time_, step, skipped, groups, world, seq = obj.values()
            if not (
                type(seq) is _int
                and 0 <= seq <= _maxi
                and version == _version
                and (world is None or (type(world) is _int and 0 < world <= _maxi))
            ):
                return _from_wire_checked(obj)
            parse = _groups_v3
        elif n == 9 and _tuple(obj) == _keys_v2:
            version, event, run, rank, time_, step, skipped, groups, seq = obj.values()
            world = None
            if not (type(seq) is _int and 0 <= seq <= _maxi and version == 2):
                return _from_wire_checked(obj)
            parse = _groups_v2
        elif n == 8 and _tuple(obj) == _keys_v1:
            version, event, run, rank, time_, step, skipped, groups = obj.values()
            seq = world = None
            if version != 1:
                return _from_wire_checked(obj)
            parse = _groups_v2
        else:
            return _from_wire_checked(obj)
        if (
            event == "norms"
            and type(version) is _int
            and type(run) is _str
            and 0 < len(run) <= _maxs
            and type(rank) is _int
            and 0 <= rank <= _maxi
            and type(time_) is _float
            and 0.0 <= time_ < _inf
            and type(step) is _int
            and 0 <= step <= _maxi
            and type(skipped) is _bool
        ):
            return _new_record(_norms, (run, rank, time_, step, skipped, parse(groups), world, seq))
    return _from_wire_checked(obj)


def _from_wire_checked(obj: Any) -> Event:
    if type(obj) is not dict:
        raise WireError("malformed", f"an event is a map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version not in SCHEMA_VERSIONS:
        raise WireError("version", f"schema version {version!r}, expected one of {SCHEMA_VERSIONS}")
    kind = obj.get("event")
    specs = _SPECS[version]
    spec = specs.get(kind) if type(kind) is str else None  # a map or array is unhashable
    if spec is None:
        raise WireError("schema", f"unknown event kind {kind!r}")
    record, fields = spec
    if len(obj) != len(fields) + 2:
        missing = [f for f, _ in fields if f not in obj]
        extra = [k for k in obj if k not in ("v", "event") and k not in dict(fields)]
        raise WireError("schema", f"missing fields {missing}, unknown fields {extra}")
    try:
        return record(**{field: check(obj[field]) for field, check in fields})
    except KeyError as exc:
        raise WireError("schema", f"missing field {exc.args[0]!r}") from None
