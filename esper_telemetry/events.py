"""The event records that travel from collectors to the daemon.

Each record is an immutable ``NamedTuple``: typed, cheap to build (the daemon builds
hundreds of thousands a second) and impossible to half-update. Every event carries the
run id, the sender's rank and its unix time in seconds; the schema version travels on the
wire (see ``codec``), not in the record, because a decoded record is always current.

Squared norms (``sq``) rather than norms travel because they add: per-device, per-shard and
per-rank partials combine by plain summation, and a square root is taken only at the end.

Schema version 1, as it stands: a ``GroupNorm``'s ``sq`` may be +Inf or NaN when that
group's ``nonfinite`` count is above 0 (and only then; never -Inf or negative). msgpack
carries both natively; a sum over ranks that includes one stays +Inf or NaN.

Schema version 2 adds one field to every event, ``seq``: the number of the ZeroMQ message
that carried it. A collector numbers its messages 0, 1, 2, ... from its ``Hello`` (a
restarted collector starts again at 0), and every event of one message carries that
message's number, so the daemon can count the messages that never reached it, whatever
dropped them. ``seq`` is ``None`` in a record of schema version 1 (a sender without
message numbers, whose losses nobody can see); the codec writes and reads each version.

Schema version 3 adds ``world`` to ``Norms``: the job's world size as the sending rank
knows it, so a daemon that started (or restarted) after the job's ``Hello``s still knows how
many ranks a sharded step needs, and never publishes a partial sum. ``world`` is ``None``
in a record of schema 1 or 2 (not known), and may be sent as nil in schema 3.

Schema version 3 also adds ``fingerprint`` to every group entry (``GroupNorm``) and group
declaration (``GroupDecl``): a 63-bit hash of what this rank counts of the group (each
parameter's name and shape; for a DTensor also its placements and which shard this rank
holds). Ranks with equal fingerprints hold replicas of the same elements and count once;
ranks with different fingerprints hold different parts, which add (README, "Distributed").
With a fingerprint, ``params`` counts the elements this rank counts, so the group's count
is the same sum; ``sharded`` false claims that this rank's value is
the group's (every rank holds the same), which the daemon checks. A declaration also
carries ``pieces``: the smallest hashes of the plain (not DTensor) parameters the rank counts
(all of them for a small group), so the daemon can see two fingerprints that share
parameters (the router on every rank beside each rank's experts), whose sum would count
the shared ones twice. ``fingerprint`` is ``None`` and ``pieces`` empty in a record of
schema 1 or 2, whose groups keep their old meaning.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA_VERSIONS",
    "ROLES",
    "GroupDecl",
    "GroupNorm",
    "Hello",
    "Norms",
    "DeviceMismatch",
    "IsolationViolation",
    "Heartbeat",
    "Goodbye",
    "Event",
    "KIND_OF",
]

SCHEMA_VERSION = 3
# Every version the codec decodes: 1 (no message numbers), 2 (``seq`` on every event) and
# 3 (``world`` on ``Norms``).
SCHEMA_VERSIONS = (1, 2, 3)

# A group's role: the host network, one of its seeds, or any other named parameter set.
ROLES = ("host", "seed", "group")


class GroupDecl(NamedTuple):
    """A watched parameter group as declared in ``Hello``: ``params`` counts scalars."""

    name: str
    role: str
    params: int
    isolated: bool
    fingerprint: int | None = None  # what this rank counts of the group (schema 3)
    # The smallest hashes of the plain parameters it counts, one per parameter (schema 3),
    # at most MAX_PIECES_PER_GROUP: ranks whose samples share a hash share that parameter.
    pieces: tuple[int, ...] = ()


class GroupNorm(NamedTuple):
    """One group's numbers for one capture.

    ``sq`` is the sum of squared gradient entries over the parameters this rank holds, or
    ``None`` when no parameter of the group had a gradient (distinct from a zero gradient).
    ``nonfinite`` counts gradient tensors holding a NaN or an Inf. ``sq`` is finite and
    non-negative, except that it may be ``inf`` or ``nan`` (never ``-inf``) when
    ``nonfinite > 0``: the sum as computed, so an exploding group never reads as one
    without gradient (accepted from schema version 1 on; earlier collector releases sent
    ``None``). ``params`` is the group's logical parameter count (the full tensors, also when
    this rank holds shards).
    ``sharded`` means ``sq`` covers only this rank's shards: the group's square norm is
    the sum over all ranks of the same step. Role and parameters travel with every capture
    so a daemon restarted mid-run needs no earlier ``Hello``.

    ``fingerprint`` (schema 3; None before) identifies what this rank counts of the group.
    With one, ``params`` counts the elements this rank counts, and the group's value is the
    sum over the distinct fingerprints of a step (equal ones are replicas, counted once);
    ``sharded`` false then claims every rank holds the same (checked by the daemon).
    """

    name: str
    role: str
    params: int
    sq: float | None
    nonfinite: int
    sharded: bool
    isolated: bool
    fingerprint: int | None = None  # what this rank counts of the group (schema 3)


class Hello(NamedTuple):
    """A collector announcing itself: sent once on attach."""

    run: str
    rank: int
    time: float
    world_size: int
    hostname: str
    pid: int
    library_version: str
    torch_version: str
    groups: tuple[GroupDecl, ...]
    # The job's gradient clipping threshold (schema 3; ``attach(clip_threshold=)``): the
    # daemon counts the steps whose model norm exceeded it. None: not given.
    clip: float | None = None
    seq: int | None = None  # the carrying message's number (schema 2); None: schema 1


class Norms(NamedTuple):
    """The per-group numbers of one capture at training step ``step``.

    ``skipped`` is true when the optimizer step this capture preceded was skipped
    (GradScaler found non-finite gradients): the numbers are reported, not lost. ``world``
    is the number of ranks of the job (schema 3): how many ranks a sharded step sums over.
    """

    run: str
    rank: int
    time: float
    step: int
    skipped: bool
    groups: tuple[GroupNorm, ...]
    world: int | None = None  # the job's world size (schema 3); None: not known
    seq: int | None = None  # the carrying message's number (schema 2); None: schema 1


class DeviceMismatch(NamedTuple):
    """A device condition worth an operator's eye, reported instead of failing.

    ``kind``: ``"split"`` (one group spans devices), ``"mixed"`` (host and seeds live on
    different devices), ``"moved"`` (a group's parameters were re-bound, e.g. after
    ``model.to(device)``) or ``"stale"`` (the group can no longer be followed: its module or
    parameters left the model; sent once, with no devices, and a later ``"moved"`` for the
    same group says it is followed again). ``devices`` are ``torch.device`` strings.
    """

    run: str
    rank: int
    time: float
    kind: str
    group: str
    devices: tuple[str, ...]
    seq: int | None = None  # the carrying message's number (schema 2); None: schema 1


class IsolationViolation(NamedTuple):
    """Evidence that gradient isolation failed for ``group``.

    ``kind``: ``"gradient"`` (a group declared isolated received gradient; ``value`` is
    its norm) or ``"structural"`` (a seed's input still carries a gradient path into the
    host; ``value`` is None). ``evidence`` is a short human-readable explanation.
    """

    run: str
    rank: int
    time: float
    step: int
    group: str
    kind: str
    evidence: str
    value: float | None
    seq: int | None = None  # the carrying message's number (schema 2); None: schema 1


class Heartbeat(NamedTuple):
    """The collector's own health: cumulative counts since attach."""

    run: str
    rank: int
    time: float
    sent: int
    dropped: int
    queue_depth: int
    errors: int
    seq: int | None = None  # the carrying message's number (schema 2); None: schema 1


class Goodbye(NamedTuple):
    """A collector closing cleanly; the daemon ends the run's series for this rank at once."""

    run: str
    rank: int
    time: float
    reason: str
    seq: int | None = None  # the carrying message's number (schema 2); None: schema 1


Event = Hello | Norms | DeviceMismatch | IsolationViolation | Heartbeat | Goodbye

# The wire name of each record type.
KIND_OF = {
    Hello: "hello",
    Norms: "norms",
    DeviceMismatch: "device",
    IsolationViolation: "violation",
    Heartbeat: "heartbeat",
    Goodbye: "goodbye",
}
