"""The Prometheus side: metric names, and the one rendering of a snapshot.

Every metric the daemon exports is named in this module (the README is the catalog).
A ``Scrape`` is built per scrape from one ``Snapshot`` (taken on the event loop by the
caller), so label sets never go stale, every number of one scrape belongs to the same
instant, and rendering it may run on any thread. A run's series are its rows
(``run_rows``): the series cap counts them and the renderer writes them, in either format
(``textformat``). Square roots and the seed/host ratio (``esper_telemetry.ratio``) are
computed here, at scrape time, not per event.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from esper_telemetry.events import SCHEMA_VERSION
from esper_telemetry.ratio import seed_ratio
from esper_telemetry.version import __version__

from .snapshot import GroupSnapshot, RunSnapshot, Snapshot
from .stats import DENY_REASONS, EVICT_REASONS, HTTP_REFUSAL_REASONS, REFUSE_REASONS
from .textformat import EOF, OPENMETRICS, escape_label, header, render_families, value
from .web import HEADER_TIMEOUT_S, MAX_BODY_BYTES, MAX_RENDERING, STALL_S

__all__ = [
    "Exposition",
    "Family",
    "RUN_FAMILIES",
    "Scrape",
    "ScrapeFigures",
    "run_rows",
    "process_registry",
    "VIOLATION_KINDS",
    "MISMATCH_KINDS",
]

_log = logging.getLogger("esper_telemetry.daemon.exporter")

# Kinds the collector is documented to send; created at zero so alerts can use rate().
VIOLATION_KINDS = ("gradient", "structural")
MISMATCH_KINDS = ("split", "mixed", "moved", "stale")


class Family(NamedTuple):
    """One per-run metric family: its name (a counter's without ``_total``), type, help, labels."""

    name: str
    type: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...]

    @property
    def sample(self) -> str:
        """The name its samples carry."""
        return self.name + "_total" if self.type == "counter" else self.name


_RG = ("run", "group")
_R = ("run",)

# Every family a run's series belong to, in the order the exposition writes them.
RUN_FAMILIES: tuple[Family, ...] = (
    Family(
        "esper_grad_norm",
        "gauge",
        "L2 norm of the group's gradient at its latest capture (sharded groups: over all "
        "ranks of the latest complete step); +Inf or NaN when the gradient held Inf or "
        "NaN. Absent while the group has no gradient, is stale or is inconsistent.",
        _RG,
    ),
    Family(
        "esper_group_has_gradient",
        "gauge",
        "1 if any parameter of the group had a gradient at its latest capture (finite or "
        "not), else 0. Absent while the group is stale or inconsistent.",
        _RG,
    ),
    Family(
        "esper_group_last_step",
        "gauge",
        "Training step of the group's latest capture (sharded groups: of the latest "
        "complete step); pairs esper_grad_norm with a step. Absent before the first.",
        _RG,
    ),
    Family(
        "esper_group_stale",
        "gauge",
        "1 while the collector reports it can no longer follow the group (its module or "
        "parameters left the model) and its numbers are not exported, else 0.",
        _RG,
    ),
    Family(
        "esper_group_inconsistent",
        "gauge",
        "1 while the ranks contradict the group's latest complete step (replicas report "
        "different values, ranks treat it as replicated while holding different "
        "parameters, or hold part of it in common and part apart) and its norm, ratio "
        "and parameter count are not exported, else 0.",
        _RG,
    ),
    Family(
        "esper_group_parameters",
        "gauge",
        "Scalar parameters in the group. Absent while the group is inconsistent.",
        _RG,
    ),
    Family(
        "esper_seed_grad_ratio",
        "gauge",
        "Parameter-normalized seed/host gradient norm ratio: "
        "(seed_norm/host_norm)*sqrt(host_params/seed_params); 0 when the host has no "
        "gradient or a zero norm; +Inf when the seed's gradient holds Inf, NaN when "
        "either holds NaN. Absent while the seed or the host is stale or inconsistent.",
        ("run", "seed"),
    ),
    Family(
        "esper_grad_nonfinite",
        "counter",
        "Captures in which the group's gradient held NaN or Inf (one per rank's capture).",
        _RG,
    ),
    Family(
        "esper_isolation_violations",
        "counter",
        "Gradient isolation violations reported for the group, by kind.",
        ("run", "group", "kind"),
    ),
    Family(
        "esper_isolation_ok",
        "gauge",
        "For isolated and seed groups: 0 if an isolation violation was reported for the "
        "latest captured step or later, else 1.",
        _RG,
    ),
    Family(
        "esper_device_mismatch",
        "counter",
        "Device conditions reported by the collectors, by kind (split, mixed, moved, stale).",
        ("run", "kind"),
    ),
    Family(
        "esper_captures",
        "counter",
        "Capture events received for the run, one per rank per capture.",
        _R,
    ),
    Family("esper_last_step", "gauge", "Training step of the run's latest capture.", _R),
    Family(
        "esper_last_capture_timestamp_seconds",
        "gauge",
        "Unix time at which the daemon received the run's latest capture, by the daemon's "
        "clock (the collectors' clocks are not trusted for it).",
        _R,
    ),
    Family(
        "esper_collectors",
        "gauge",
        "Collectors (ranks) of the run heard from within the TTL that have not said goodbye.",
        _R,
    ),
    Family(
        "esper_collector_dropped_events",
        "counter",
        "Events the run's collectors dropped before sending (full queue or socket), as "
        "their heartbeats report, summed over ranks.",
        _R,
    ),
    Family(
        "esper_daemon_incomplete_steps",
        "counter",
        "Sharded steps given up because not every rank reported within the shard window.",
        _R,
    ),
    Family(
        "esper_daemon_dropped_shard_reports",
        "counter",
        "Sharded reports not added to a step: a rank's repeat of a step it already "
        "reported, or a report for a step already published or given up.",
        _R,
    ),
    Family(
        "esper_run_ended",
        "gauge",
        "1 while the run is kept after every rank said goodbye (its final values, for "
        "the ended-retention time), 0 while it is live.",
        _R,
    ),
    Family(
        "esper_grad_norm_max",
        "gauge",
        "Largest finite norm of the group among the captures of the trailing window "
        "(--window.seconds, at most one bucket more): a one-step spike stays in the band "
        "for a whole window whatever the scrape interval. Absent without a finite norm in "
        "the window, or while the group is stale or inconsistent.",
        _RG,
    ),
    Family(
        "esper_grad_norm_min",
        "gauge",
        "Smallest finite norm of the group among the captures of the trailing window "
        "(as esper_grad_norm_max).",
        _RG,
    ),
    Family(
        "esper_grad_norm_spikes",
        "counter",
        "Captures whose norm exceeded --spike.factor times the median of the group's "
        "previous 32 finite norms (judged after 8): every step is judged, not only those "
        "a scrape sees.",
        _RG,
    ),
    Family(
        "esper_model_grad_norm",
        "gauge",
        "Norm over all the run's groups at its latest complete step (every group's value "
        "in): the model's gradient norm when the groups cover the model, as the HF "
        "Trainer logs grad_norm before clipping. Absent before the first complete step.",
        _R,
    ),
    Family(
        "esper_grad_clip_threshold",
        "gauge",
        "The run's gradient clipping threshold, as its collectors sent it "
        "(attach(clip_threshold=), the trainer callbacks' max_grad_norm or "
        "gradient_clip_val). Absent when not given.",
        _R,
    ),
    Family(
        "esper_model_steps",
        "counter",
        "Complete steps of the run: every group's value in, counted once whatever the "
        "number of ranks.",
        _R,
    ),
    Family(
        "esper_model_steps_given_up",
        "counter",
        "Steps of the run whose model norm was never complete: a group's value for them "
        "had not come while 64 newer steps waited (a group that stopped reporting), so "
        "neither the model norm nor the clipped count saw them.",
        _R,
    ),
    Family(
        "esper_grad_clipped",
        "counter",
        "Complete steps whose model norm exceeded the clip threshold (0 while none is "
        "known): the steps the job's clipping scaled down.",
        _R,
    ),
    Family(
        "esper_messages_lost",
        "counter",
        "Messages of the collector (run, rank) that never reached the aggregator, "
        "counted from the gaps in its message numbers, whatever the cause (a reconnect, "
        "an oversize frame, a full queue, a rejected message). Counted from the first "
        "message this daemon process saw from it.",
        ("run", "rank"),
    ),
)
_LOST = len(RUN_FAMILIES) - 1  # written only when the snapshot has loss accounting

Row = tuple[tuple[str, ...], float]


def run_rows(run: RunSnapshot, lost: Sequence[tuple[int, int]] = ()) -> list[list[Row]]:
    """The series of one run: per family of ``RUN_FAMILIES``, (label values, value) rows.

    ``lost`` is the run's (rank, messages lost) pairs. The one definition of what a run
    exports: the series cap counts these rows and the renderer writes them.
    """
    rows: list[list[Row]] = [[] for _ in RUN_FAMILIES]
    (
        norm,
        has_grad,
        group_step,
        stale,
        inconsistent,
        params,
        ratio,
        nonfinite,
        violations,
        iso_ok,
        mismatch,
        captures,
        last_step,
        last_ts,
        collectors,
        dropped,
        incomplete,
        dropped_shards,
        ended,
        norm_max,
        norm_min,
        spikes,
        model_norm,
        clip_threshold,
        model_steps,
        model_given_up,
        clipped,
        lost_rows,
    ) = rows
    r = run.name
    host: GroupSnapshot | None = None
    for g in run.groups:
        if g.role == "host" and g.captured:
            host = g
            break
    if host is not None and (host.stale or host.inconsistent):
        host = None  # a ratio over numbers that mean nothing is no ratio
    for g in run.groups:
        labels = (r, g.name)
        if g.params is not None and g.inconsistent is None:
            params.append((labels, g.params))
        nonfinite.append((labels, g.nonfinite))
        watched = g.isolated or g.role == "seed" or bool(g.violations)
        if watched:
            for kind in VIOLATION_KINDS:
                if kind not in g.violations:
                    violations.append(((r, g.name, kind), 0))
        for kind, n in g.violations.items():
            violations.append(((r, g.name, kind), n))
        stale.append((labels, 1 if g.stale else 0))
        inconsistent.append((labels, 0 if g.inconsistent is None else 1))
        if g.captured and g.step >= 0:
            group_step.append((labels, g.step))
        spikes.append((labels, g.spikes))
        if g.window is not None and not g.stale and g.inconsistent is None:
            norm_min.append((labels, g.window[0]))
            norm_max.append((labels, g.window[1]))
        if g.captured and not g.stale and g.inconsistent is None:
            if g.sq is None:
                has_grad.append((labels, 0))
            else:
                has_grad.append((labels, 1))
                norm.append((labels, math.sqrt(g.sq)))
            if g.role == "seed" and host is not None:
                ratio.append((labels, seed_ratio(g.sq, g.params, host.sq, host.params)))
        if watched and (g.captured or g.violation_step >= 0):
            ok = 0 if g.violation_step >= 0 and g.violation_step >= g.step else 1
            iso_ok.append((labels, ok))
    run_l = (r,)
    for kind in MISMATCH_KINDS:
        if kind not in run.device_mismatch:
            mismatch.append(((r, kind), 0))
    for kind, n in run.device_mismatch.items():
        mismatch.append(((r, kind), n))
    captures.append((run_l, run.captures))
    if run.last_step >= 0:
        last_step.append((run_l, run.last_step))
        last_ts.append((run_l, run.last_capture_time))
    collectors.append((run_l, run.collectors))
    dropped.append((run_l, run.dropped))
    incomplete.append((run_l, run.incomplete_steps))
    dropped_shards.append((run_l, run.dropped_shard_reports))
    ended.append((run_l, 1 if run.ended else 0))
    if run.model_norm is not None:
        model_norm.append((run_l, run.model_norm))
    if run.clip_threshold is not None:
        clip_threshold.append((run_l, run.clip_threshold))
    model_steps.append((run_l, run.model_steps))
    model_given_up.append((run_l, run.model_given_up))
    clipped.append((run_l, run.clipped))
    for rank, n in lost:
        lost_rows.append(((r, str(rank)), n))
    return rows


def lost_by_run(snap: Snapshot) -> dict[str, list[tuple[int, int]]]:
    """The snapshot's message losses as (rank, count) pairs per run, ranks in order."""
    out: dict[str, list[tuple[int, int]]] = {}
    for (run, rank), n in sorted((snap.messages_lost or {}).items()):
        out.setdefault(run, []).append((rank, n))
    return out


class ScrapeFigures(NamedTuple):
    """What the series cap left out of one scrape, and the scrapes truncated so far."""

    omitted_runs: int = 0
    omitted_series: int = 0
    truncated_scrapes: int = 0


def _unsequenced(snap: Snapshot) -> Iterator[Metric]:
    if snap.unsequenced_messages is not None:
        yield CounterMetricFamily(
            "esper_daemon_unsequenced_messages",
            "Messages applied that carried no message number (schema 1 senders): their "
            "losses cannot be counted.",
            value=snap.unsequenced_messages,
        )


def _untrusted(snap: Snapshot) -> Iterator[Metric]:
    """What the aggregator would not believe: out-of-world events, jumps in message numbers,
    sharded steps that waited for a world size."""
    refused = CounterMetricFamily(
        "esper_daemon_refused_events",
        "Events refused whole for what they claim about their run, by reason: "
        "rank_outside_world (a rank at or past the run's world size, or past the event's "
        "own), world_too_large (a world size above --limits.max-ranks-per-run).",
        labels=["reason"],
    )
    for reason in REFUSE_REASONS:
        refused.add_metric([reason], (snap.refused or {}).get(reason, 0))
    yield refused
    if snap.world_unknown_steps is not None:
        yield CounterMetricFamily(
            "esper_daemon_world_unknown_steps",
            "Sharded steps that had to wait because their run's world size was not known "
            "(no Hello seen and collectors older than wire schema 3); published once it is "
            "known, else given up and counted in esper_daemon_incomplete_steps_total.",
            value=snap.world_unknown_steps,
        )
    # Created at 0 (also in an aggregator's own snapshot), so rules can use rate() at once.
    sheds = CounterMetricFamily(
        "esper_daemon_memory_sheds",
        "Times the daemon's resident memory passed --limits.memory-bytes and it dropped "
        "collector connections, by what: connection (the one that received the most), "
        "all (every one, when that was not enough). What libzmq held for them, a "
        "multipart message still arriving included, is freed; collectors reconnect.",
        labels=["what"],
    )
    for what in ("connection", "all"):
        sheds.add_metric([what], (snap.memory_sheds or {}).get(what, 0))
    yield sheds
    if snap.implausible_sequence is not None:
        yield CounterMetricFamily(
            "esper_daemon_implausible_sequence_numbers",
            "Messages whose number jumped further than their collector could have sent "
            "since it was last heard from (e.g. 2^63-1): no loss counted for them.",
            value=snap.implausible_sequence,
        )


def _self_metrics(snap: Snapshot, scrape: ScrapeFigures) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "esper_daemon_messages", "ZeroMQ messages received, accepted or not.", value=snap.messages
    )
    yield CounterMetricFamily(
        "esper_daemon_events", "Events decoded and handed to the aggregator.", value=snap.events
    )
    rejected = CounterMetricFamily(
        "esper_daemon_rejected",
        "Messages rejected whole, by reason: the wire codec's (limit, malformed, version, "
        "schema, value), queue_full, internal, shutdown.",
        labels=["reason"],
    )
    for reason, n in snap.rejected.items():
        rejected.add_metric([reason], n)
    yield rejected
    overflow = CounterMetricFamily(
        "esper_daemon_overflow",
        "Events (or parts of them) refused by a cap, by what was capped: runs, groups, ranks, "
        "label_values, pending_steps.",
        labels=["what"],
    )
    for what, n in snap.overflow.items():
        overflow.add_metric([what], n)
    yield overflow
    yield from _untrusted(snap)
    yield GaugeMetricFamily(
        "esper_daemon_runs", "Runs held, ended runs kept included.", value=len(snap.runs)
    )
    evicted = CounterMetricFamily(
        "esper_daemon_runs_evicted",
        "Runs removed from the full run table to admit a new run, by reason: ended (kept "
        "after its goodbye), no_captures (never sent norms), idle (no event for "
        "--run.evict-after-seconds), young (sent norms, but all its events came within "
        "10 s: a burst of junk run names).",
        labels=["reason"],
    )
    for reason in EVICT_REASONS:
        evicted.add_metric([reason], (snap.evicted or {}).get(reason, 0))
    yield evicted
    # Created at 0 whether CURVE is on or not, so rules can use rate() at once.
    denied = CounterMetricFamily(
        "esper_daemon_auth_denied",
        "Collector connections refused at the CURVE handshake, by reason: no_curve (a "
        "plain ZeroMQ peer), unknown_key (a key not in the authorized-keys directory), "
        "handshake (a wrong daemon key, a broken peer). Every attempt counts.",
        labels=["reason"],
    )
    for reason in DENY_REASONS:
        denied.add_metric([reason], (snap.auth_denied or {}).get(reason, 0))
    yield denied
    http = CounterMetricFamily(
        "esper_daemon_http_refused",
        "HTTP clients turned away, by reason: max_connections (503 past "
        "--web.max-connections, every slot with a request in progress), write_timeout (a "
        "response not read within --web.write-timeout-seconds), unauthorized (401), "
        f"header_timeout (no complete request within {HEADER_TIMEOUT_S:g} s, or pushed out "
        "by newer connections still sending theirs), preempted (a response not read for "
        f"{STALL_S:g} s, given up for a scrape that needed its bytes), bad_request (400: "
        "not HTTP, or a malformed header), page_busy (503: the live page's or its API's "
        "documents already in flight), page_write_timeout (such a document not read within "
        "--web.write-timeout-seconds), busy (503: the "
        f"response bodies being rendered or written would pass {MAX_BODY_BYTES >> 20} MiB, "
        f"or {MAX_RENDERING} scrapes were already rendering).",
        labels=["reason"],
    )
    refused = snap.http_refused or {}
    for reason in (*HTTP_REFUSAL_REASONS, *(r for r in refused if r not in HTTP_REFUSAL_REASONS)):
        http.add_metric([reason], refused.get(reason, 0))
    yield http
    yield GaugeMetricFamily(
        "esper_daemon_scrape_omitted_runs",
        "Runs left out of this scrape whole because it would have carried more series "
        "than --web.max-series (the least active first); 0 when every run fit.",
        value=scrape.omitted_runs,
    )
    yield GaugeMetricFamily(
        "esper_daemon_scrape_omitted_series",
        "Series of the runs left out of this scrape by --web.max-series.",
        value=scrape.omitted_series,
    )
    yield CounterMetricFamily(
        "esper_daemon_scrapes_truncated",
        "Scrapes that left runs out because of --web.max-series, this one included.",
        value=scrape.truncated_scrapes,
    )
    yield CounterMetricFamily(
        "esper_daemon_expired_runs",
        "Runs dropped after the TTL without events.",
        value=snap.expired_runs,
    )
    yield CounterMetricFamily(
        "esper_daemon_ended_runs",
        "Runs ended because every rank said goodbye.",
        value=snap.ended_runs,
    )
    if snap.queue_length is not None:
        yield GaugeMetricFamily(
            "esper_daemon_queue_length",
            "Events waiting between receiver and aggregator.",
            value=snap.queue_length,
        )
    if snap.queue_capacity is not None:
        yield GaugeMetricFamily(
            "esper_daemon_queue_capacity",
            "Capacity of the receiver-to-aggregator queue in events.",
            value=snap.queue_capacity,
        )
    yield InfoMetricFamily(
        "esper_daemon_build",
        "Daemon version and wire schema version.",
        value={"version": __version__, "schema": str(SCHEMA_VERSION)},
    )


def _priority(run: RunSnapshot) -> int:
    """Which runs the series cap keeps first: live runs with norms, then live runs that
    never sent norms, then runs no rank was heard from within the TTL, then ended runs."""
    if run.ended:
        return 3
    if run.collectors == 0:
        return 2
    return 0 if run.captures else 1


def _count(metrics: Sequence[Metric]) -> int:
    return sum(len(m.samples) for m in metrics)


def _fragments(rows: list[list[Row]], escaped: dict[str, str]) -> list[str]:
    """A run's rows as exposition lines, one string per family (the same in both formats)."""
    out: list[str] = []
    labelled: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}
    for family, rs in zip(RUN_FAMILIES, rows):
        if not rs:
            out.append("")
            continue
        name, names = family.sample, family.labels
        lines = []
        for labels, v in rs:
            key = (names, labels)
            lab = labelled.get(key)
            if lab is None:
                parts = []
                for k, x in zip(names, labels):
                    e = escaped.get(x)
                    if e is None:
                        e = escaped[x] = escape_label(x)
                    parts.append(f'{k}="{e}"')
                lab = labelled[key] = "{" + ",".join(parts) + "} "
            lines.append(f"{name}{lab}{value(v)}\n")
        out.append("".join(lines))
    return out


class Scrape:
    """One scrape, ready to render: the runs the series cap kept (their series already
    written as lines, the same in both formats), the daemon's own families, the process's."""

    def __init__(
        self,
        snapshot: Snapshot,
        runs: Sequence[tuple[RunSnapshot, int, list[str]]],
        figures: ScrapeFigures,
        process: Sequence[Metric],
        escaped: dict[str, str],
    ) -> None:
        self.snapshot = snapshot
        # (run, its series, its lines per family of RUN_FAMILIES) in the snapshot's order
        self.runs = runs
        self.figures = figures
        self._process = process
        self._escaped = escaped  # label values escaped so far, by value

    def render(self, fmt: str) -> bytes:
        """The exposition in ``fmt`` (``textformat.TEXT`` or ``OPENMETRICS``), as bytes."""
        snap = self.snapshot
        escaped = self._escaped
        frags = [lines for _, _, lines in self.runs]
        out: list[str] = []
        for i, family in enumerate(RUN_FAMILIES[:_LOST]):
            out.append(header(family.name, family.type, family.help, fmt))
            out.extend(f[i] for f in frags)
        out.extend(render_families(_self_metrics(snap, self.figures), fmt, escaped))
        if snap.messages_lost is not None:
            family = RUN_FAMILIES[_LOST]
            out.append(header(family.name, family.type, family.help, fmt))
            out.extend(f[_LOST] for f in frags)
        out.extend(render_families(_unsequenced(snap), fmt, escaped))
        out.extend(render_families(self._process, fmt, escaped))
        if fmt == OPENMETRICS:
            out.append(EOF)
        return "".join(out).encode("utf-8")


class Exposition:
    """The daemon's scrapes: at most ``max_series`` series each, overflow counted and logged.

    When the runs' series and the daemon's own would exceed ``max_series``, whole runs are
    left out (a run is never shown in part), by ``_priority`` and, within a class, the runs
    held longest kept first, so the same runs stay in from one scrape to the next; a run
    larger than what is left is skipped and smaller ones after it may still fit. The
    daemon's own families (and the process's) are always written, and say what was left out.
    ``scrape`` may run on several threads at once.
    """

    def __init__(
        self,
        max_series: int,
        process: CollectorRegistry | None = None,
        logger: logging.Logger = _log,
        clock: Callable[[], float] = time.monotonic,
        remind_s: float = 300.0,
    ) -> None:
        self.max_series = max_series
        self._process = process
        self._log = logger
        self._clock = clock
        self._remind_s = remind_s
        self._lock = threading.Lock()
        self.truncated = 0  # scrapes that left runs out
        self._truncating = False
        self._said = -math.inf

    def scrape(self, snapshot: Snapshot) -> Scrape:
        """What one scrape of ``snapshot`` carries (the cap applied), ready to render.

        Each run's rows are made once: their number is the run's size for the cap, and a
        kept run's are written at once, while they are fresh in memory (its lines are what
        the scrape holds: at most ``max_series`` of them).
        """
        process = list(self._process.collect()) if self._process is not None else []
        own = (
            _count(list(_self_metrics(snapshot, ScrapeFigures())))
            + _count(list(_unsequenced(snapshot)))
            + _count(process)
        )
        budget = self.max_series - own
        lost = lost_by_run(snapshot)
        runs = snapshot.runs
        escaped: dict[str, str] = {}
        kept: dict[int, tuple[RunSnapshot, int, list[str]]] = {}
        omitted_runs = omitted_series = 0
        # Greedy in priority order (a stable sort: the runs held longest first within a
        # class); when every run fits, that keeps them all.
        for index in sorted(range(len(runs)), key=lambda i: _priority(runs[i])):
            run = runs[index]
            rows = run_rows(run, lost.get(run.name, ()))
            n = sum(map(len, rows))
            if n <= budget:
                kept[index] = (run, n, _fragments(rows, escaped))
                budget -= n
            else:
                omitted_runs += 1
                omitted_series += n
        truncating = omitted_runs > 0
        with self._lock:
            if truncating:
                self.truncated += 1
            figures = ScrapeFigures(omitted_runs, omitted_series, self.truncated)
            self._settle(truncating, figures, snapshot)
        return Scrape(snapshot, [kept[i] for i in sorted(kept)], figures, process, escaped)

    def render(self, snapshot: Snapshot, fmt: str) -> bytes:
        """One scrape of ``snapshot`` in ``fmt``: what the daemon serves (any thread)."""
        return self.scrape(snapshot).render(fmt)

    def _settle(self, truncating: bool, figures: ScrapeFigures, snapshot: Snapshot) -> None:
        """Logs a change of state, and a reminder every ``remind_s`` while runs are left out."""
        now = self._clock()
        if truncating and (not self._truncating or now - self._said >= self._remind_s):
            self._said = now
            self._log.warning(
                "scrapes leave runs out: %d of %d runs (%d series) over --web.max-series=%d; "
                "esper_daemon_scrape_omitted_series says how many each scrape leaves out",
                figures.omitted_runs,
                len(snapshot.runs),
                figures.omitted_series,
                self.max_series,
            )
        elif not truncating and self._truncating:
            self._log.info(
                "scrapes carry every run again (%d runs, --web.max-series=%d)",
                len(snapshot.runs),
                self.max_series,
            )
        self._truncating = truncating


def process_registry() -> CollectorRegistry:
    """The process, platform and GC metrics, in a registry of the daemon's own (not the global)."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
