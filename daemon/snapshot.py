"""The detached, immutable view of the daemon's state that one scrape renders.

The aggregator builds it on the event-loop thread in one pass and the daemon adds the
queue's figures (so every number in a scrape belongs to the same instant); the exporter
renders it on a worker thread without touching live state. Raw sums of squares travel
here; square roots and ratios are the exporter's.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["GroupSnapshot", "RunSnapshot", "Snapshot"]


class GroupSnapshot(NamedTuple):
    name: str
    role: str
    params: int | None  # None until a Hello or a capture declared it
    isolated: bool
    captured: bool  # a capture (a complete step, if sharded) has been published
    sq: float | None  # latest published sum of squares (+Inf/NaN kept); None: no gradient
    step: int  # step of the latest published capture, -1 before any
    nonfinite: int  # captures in which the group held NaN or Inf
    violations: dict[str, int]  # isolation violations by kind
    violation_step: int  # highest step of a violation, -1 before any
    stale: bool = False  # reported as no longer followed (and not moved back since)
    # Why the ranks contradict the latest complete step (daemon/layout.py: "values",
    # "contents"); its norm and ratio are then not exported. None: they do not.
    inconsistent: str | None = None
    # Every step (daemon/steps.py): the (min, max) finite norm of the trailing window
    # (None: no finite norm in it) and the spikes counted since the run began.
    window: tuple[float, float] | None = None
    spikes: int = 0


class RunSnapshot(NamedTuple):
    name: str
    captures: int
    last_step: int  # -1 before any capture
    # Unix time (the daemon's clock) at which the latest capture arrived; 0 before any.
    last_capture_time: float
    collectors: int  # ranks heard from within the TTL, less those that said goodbye
    dropped: int  # events the collectors report having dropped, summed over ranks
    incomplete_steps: int
    device_mismatch: dict[str, int]
    groups: tuple[GroupSnapshot, ...]
    ended: bool = False  # every rank said goodbye; kept for the ended-retention time
    dropped_shard_reports: int = 0  # sharded reports repeated or late (shards.StepAssembly)
    # The collector's own unix time of the run's latest capture: information only, since a
    # collector's clock may be off (by hours, or absurdly: 1e300); nothing is judged by it.
    collector_time: float = 0.0
    # The model norm (over the run's groups) of its latest complete step, None before one;
    # the clip threshold its collectors sent (None: not given); complete steps, and those
    # whose model norm exceeded the threshold (daemon/steps.py, ModelSteps).
    model_norm: float | None = None
    clip_threshold: float | None = None
    model_steps: int = 0
    model_given_up: int = 0  # steps given up before every group's value came
    clipped: int = 0


class Snapshot(NamedTuple):
    runs: tuple[RunSnapshot, ...]
    messages: int
    events: int
    rejected: dict[str, int]
    overflow: dict[str, int]
    expired_runs: int
    ended_runs: int
    queue_length: int | None = None  # None: not known (an aggregator on its own)
    queue_capacity: int | None = None
    evicted: dict[str, int] | None = None  # runs that made room for a new one, by reason
    # Loss accounting (sequence.py): messages lost per (run, rank) of the runs held,
    # and messages that carried no number (schema 1 senders).
    messages_lost: dict[tuple[str, int], int] | None = None
    unsequenced_messages: int | None = None
    # CURVE handshakes refused on the ingest sockets, by reason (daemon/curve.py); the
    # daemon adds them like the queue's figures.
    auth_denied: dict[str, int] | None = None
    # HTTP requests or connections turned away, by reason (web.py); added by the daemon.
    http_refused: dict[str, int] | None = None
    # Events the aggregator refused, by reason (stats.REFUSE_REASONS); sharded steps that
    # waited for an unknown world size; messages whose number jumped implausibly far.
    refused: dict[str, int] | None = None
    world_unknown_steps: int | None = None
    implausible_sequence: int | None = None
    # Collector connections dropped past --limits.memory-bytes (memory.py); by the daemon.
    memory_sheds: dict[str, int] | None = None
