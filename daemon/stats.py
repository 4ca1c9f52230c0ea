"""The daemon's self-metrics: plain counters the pipeline stages bump and the exporter reads.

Plain ints rather than prometheus_client instruments: every stage runs on the event loop
thread, so no lock is needed, and an increment costs one attribute store on the hot path.
Every label value is created up front at zero so alert rules can use ``rate()`` at once.
"""

from __future__ import annotations

from esper_telemetry.codec import REASONS

__all__ = [
    "DaemonStats",
    "REJECT_REASONS",
    "OVERFLOW_KINDS",
    "EVICT_REASONS",
    "DENY_REASONS",
    "HTTP_REFUSAL_REASONS",
    "REFUSE_REASONS",
]

# Why a whole message was rejected: the codec's reasons, plus "queue_full" (the
# receiver-to-aggregator queue had no room for the message's events), "internal" (a
# daemon bug while applying it; logged at error level, the daemon stays up) and
# "shutdown" (still buffered, or still queued, when the shutdown deadline passed).
REJECT_REASONS = tuple(REASONS) + ("queue_full", "internal", "shutdown")

# What a cap refused: a new run, a new group of a run, a new rank of a run, a new label
# value (violation or device-mismatch kind), a sharded step awaiting its ranks.
OVERFLOW_KINDS = ("runs", "groups", "ranks", "label_values", "pending_steps")

# Why the aggregator refused an event for what it claims about its run: a rank at or past
# the world size (the event's own, or the run's latest known), or a world size above
# --limits.max-ranks-per-run.
REFUSE_REASONS = ("rank_outside_world", "world_too_large")

# Why a run left the full run table to make room for a new one: it had ended (and was
# kept for the ended-retention time), it never sent norms, it was idle past the limit, it
# was young (norms, but heard from for less than aggregator.ESTABLISHED_AFTER_S).
EVICT_REASONS = ("ended", "no_captures", "idle", "young")

# Why a collector's CURVE handshake was refused (daemon/curve.py says how each is told).
DENY_REASONS = ("no_curve", "unknown_key", "handshake")

# Why the HTTP side turned a client away: the connection cap (503), a response it did not
# read within the write timeout, missing or wrong basic-auth credentials (401), no
# complete request within the header timeout (closed), a response it did not read given
# up for a scrape that needed its bytes, a request that is not HTTP (400); the live page
# and its API's documents refused while others were in flight (503), or not read in time.
HTTP_REFUSAL_REASONS = (
    "max_connections",
    "write_timeout",
    "unauthorized",
    "header_timeout",
    "preempted",
    "bad_request",
    "page_busy",
    "page_write_timeout",
)


class DaemonStats:
    """Counters for the daemon's own health; each only goes up."""

    __slots__ = (
        "messages",
        "events",
        "rejected",
        "overflow",
        "expired_runs",
        "ended_runs",
        "evicted",
        "refused",
        "world_unknown_steps",
        "memory_sheds",
    )

    def __init__(self) -> None:
        self.messages = 0  # ZeroMQ frames received, good or bad
        self.events = 0  # events decoded and applied by the aggregator
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)  # in messages
        self.overflow: dict[str, int] = dict.fromkeys(OVERFLOW_KINDS, 0)
        self.expired_runs = 0  # runs dropped after the TTL
        self.ended_runs = 0  # runs ended by every rank's goodbye
        self.evicted: dict[str, int] = dict.fromkeys(EVICT_REASONS, 0)  # in runs
        self.refused: dict[str, int] = dict.fromkeys(REFUSE_REASONS, 0)  # in events
        # Sharded steps that had to wait because their run's world size was not known.
        self.world_unknown_steps = 0
        # Collector connections dropped past --limits.memory-bytes (memory.SHED_WHAT).
        self.memory_sheds: dict[str, int] = {"connection": 0, "all": 0}
