"""The Prometheus side: metric names, and a custom ``Collector`` that renders a snapshot.

Every metric the daemon exports is named in this module (the README is the catalog).
An ``EsperCollector`` is built per scrape from one ``Snapshot`` (taken on the event loop by
the caller), so label sets never go stale, every number of one scrape belongs to the same
instant, and rendering it may run on any thread. Square roots and the seed/host ratio
(``esper_telemetry.ratio``) are computed here, at scrape time, not per event.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from esper_telemetry.events import SCHEMA_VERSION
from esper_telemetry.ratio import seed_ratio
from esper_telemetry.version import __version__

from .snapshot import GroupSnapshot, Snapshot
from .stats import DENY_REASONS, EVICT_REASONS, HTTP_REFUSAL_REASONS

__all__ = ["EsperCollector", "scrape_registry", "process_registry", "VIOLATION_KINDS",
           "MISMATCH_KINDS"]

# Kinds the collector is documented to send; created at zero so alerts can use rate().
VIOLATION_KINDS = ("gradient", "structural")
MISMATCH_KINDS = ("split", "mixed", "moved", "stale")


class EsperCollector(Collector):
    """Every esper_* family of one ``Snapshot``: build one per scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snap = snapshot

    def describe(self) -> List[Metric]:
        # Nothing at registration: collect() is per scrape, and names never clash.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        rg = ["run", "group"]
        grad_norm = GaugeMetricFamily(
            "esper_grad_norm",
            "L2 norm of the group's gradient at its latest capture (sharded groups: over all "
            "ranks of the latest complete step); +Inf or NaN when the gradient held Inf or "
            "NaN. Absent while the group has no gradient or is stale.",
            labels=rg)
        has_grad = GaugeMetricFamily(
            "esper_group_has_gradient",
            "1 if any parameter of the group had a gradient at its latest capture (finite or "
            "not), else 0. Absent while the group is stale.",
            labels=rg)
        stale = GaugeMetricFamily(
            "esper_group_stale",
            "1 while the collector reports it can no longer follow the group (its module or "
            "parameters left the model) and its numbers are not exported, else 0.",
            labels=rg)
        group_step = GaugeMetricFamily(
            "esper_group_last_step",
            "Training step of the group's latest capture (sharded groups: of the latest "
            "complete step); pairs esper_grad_norm with a step. Absent before the first.",
            labels=rg)
        params = GaugeMetricFamily(
            "esper_group_parameters", "Scalar parameters in the group.", labels=rg)
        ratio = GaugeMetricFamily(
            "esper_seed_grad_ratio",
            "Parameter-normalized seed/host gradient norm ratio: "
            "(seed_norm/host_norm)*sqrt(host_params/seed_params); 0 when the host has no "
            "gradient or a zero norm; +Inf when the seed's gradient holds Inf, NaN when "
            "either holds NaN. Absent while the seed or the host is stale.",
            labels=["run", "seed"])
        nonfinite = CounterMetricFamily(
            "esper_grad_nonfinite",
            "Captures in which the group's gradient held NaN or Inf (one per rank's capture).",
            labels=rg)
        violations = CounterMetricFamily(
            "esper_isolation_violations",
            "Gradient isolation violations reported for the group, by kind.",
            labels=["run", "group", "kind"])
        iso_ok = GaugeMetricFamily(
            "esper_isolation_ok",
            "For isolated and seed groups: 0 if an isolation violation was reported for the "
            "latest captured step or later, else 1.",
            labels=rg)
        mismatch = CounterMetricFamily(
            "esper_device_mismatch",
            "Device conditions reported by the collectors, by kind (split, mixed, moved, "
            "stale).",
            labels=["run", "kind"])
        captures = CounterMetricFamily(
            "esper_captures", "Capture events received for the run, one per rank per capture.",
            labels=["run"])
        last_step = GaugeMetricFamily(
            "esper_last_step", "Training step of the run's latest capture.", labels=["run"])
        last_ts = GaugeMetricFamily(
            "esper_last_capture_timestamp_seconds",
            "Unix time (collector's clock) of the run's latest capture.", labels=["run"])
        collectors = GaugeMetricFamily(
            "esper_collectors",
            "Collectors (ranks) of the run heard from within the TTL that have not said "
            "goodbye.", labels=["run"])
        dropped = CounterMetricFamily(
            "esper_collector_dropped_events",
            "Events the run's collectors dropped before sending (full queue or socket), as "
            "their heartbeats report, summed over ranks.", labels=["run"])
        ended = GaugeMetricFamily(
            "esper_run_ended",
            "1 while the run is kept after every rank said goodbye (its final values, for "
            "the ended-retention time), 0 while it is live.", labels=["run"])
        incomplete = CounterMetricFamily(
            "esper_daemon_incomplete_steps",
            "Sharded steps given up because not every rank reported within the shard window.",
            labels=["run"])

        for run in snap.runs:
            r = run.name
            host: Optional[GroupSnapshot] = None
            for g in run.groups:
                if g.role == "host" and g.captured:
                    host = g
                    break
            if host is not None and host.stale:
                host = None  # a ratio over numbers that mean nothing is no ratio
            for g in run.groups:
                labels = [r, g.name]
                if g.params is not None:
                    params.add_metric(labels, g.params)
                nonfinite.add_metric(labels, g.nonfinite)
                watched = g.isolated or g.role == "seed" or bool(g.violations)
                if watched:
                    for kind in VIOLATION_KINDS:
                        if kind not in g.violations:
                            violations.add_metric([r, g.name, kind], 0)
                for kind, n in g.violations.items():
                    violations.add_metric([r, g.name, kind], n)
                stale.add_metric(labels, 1 if g.stale else 0)
                if g.captured and g.step >= 0:
                    group_step.add_metric(labels, g.step)
                if g.captured and not g.stale:
                    if g.sq is None:
                        has_grad.add_metric(labels, 0)
                    else:
                        has_grad.add_metric(labels, 1)
                        grad_norm.add_metric(labels, math.sqrt(g.sq))
                    if g.role == "seed" and host is not None:
                        ratio.add_metric(labels, seed_ratio(g.sq, g.params, host.sq, host.params))
                if watched and (g.captured or g.violation_step >= 0):
                    ok = 0 if g.violation_step >= 0 and g.violation_step >= g.step else 1
                    iso_ok.add_metric(labels, ok)
            run_l = [r]
            for kind in MISMATCH_KINDS:
                if kind not in run.device_mismatch:
                    mismatch.add_metric([r, kind], 0)
            for kind, n in run.device_mismatch.items():
                mismatch.add_metric([r, kind], n)
            captures.add_metric(run_l, run.captures)
            if run.last_step >= 0:
                last_step.add_metric(run_l, run.last_step)
                last_ts.add_metric(run_l, run.last_capture_time)
            collectors.add_metric(run_l, run.collectors)
            dropped.add_metric(run_l, run.dropped)
            incomplete.add_metric(run_l, run.incomplete_steps)
            ended.add_metric(run_l, 1 if run.ended else 0)

        yield from (grad_norm, has_grad, group_step, stale, params, ratio, nonfinite, violations, iso_ok,
                    mismatch, captures, last_step, last_ts, collectors, dropped, incomplete,
                    ended)
        yield from _self_metrics(snap)
        yield from _loss_metrics(snap)


def _loss_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Loss accounting (daemon/sequence.py): gaps in the collectors' message numbers."""
    if snap.messages_lost is not None:
        lost = CounterMetricFamily(
            "esper_messages_lost",
            "Messages of the collector (run, rank) that never reached the aggregator, "
            "counted from the gaps in its message numbers, whatever the cause (a reconnect, "
            "an oversize frame, a full queue, a rejected message). Counted from the first "
            "message this daemon process saw from it.", labels=["run", "rank"])
        held = {run.name for run in snap.runs}
        for (run, rank), n in sorted(snap.messages_lost.items()):
            if run in held:
                lost.add_metric([run, str(rank)], n)
        yield lost
    if snap.unsequenced_messages is not None:
        yield CounterMetricFamily(
            "esper_daemon_unsequenced_messages",
            "Messages applied that carried no message number (schema 1 senders): their "
            "losses cannot be counted.", value=snap.unsequenced_messages)


def _self_metrics(snap: Snapshot) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "esper_daemon_messages", "ZeroMQ messages received, accepted or not.",
        value=snap.messages)
    yield CounterMetricFamily(
        "esper_daemon_events", "Events decoded and handed to the aggregator.", value=snap.events)
    rejected = CounterMetricFamily(
        "esper_daemon_rejected",
        "Messages rejected whole, by reason: the wire codec's (limit, malformed, version, "
        "schema, value), queue_full, internal, shutdown.", labels=["reason"])
    for reason, n in snap.rejected.items():
        rejected.add_metric([reason], n)
    yield rejected
    overflow = CounterMetricFamily(
        "esper_daemon_overflow",
        "Events (or parts of them) refused by a cap, by what was capped: runs, groups, ranks, "
        "label_values, pending_steps.", labels=["what"])
    for what, n in snap.overflow.items():
        overflow.add_metric([what], n)
    yield overflow
    yield GaugeMetricFamily("esper_daemon_runs", "Runs held, ended runs kept included.",
                            value=len(snap.runs))
    evicted = CounterMetricFamily(
        "esper_daemon_runs_evicted",
        "Runs removed from the full run table to admit a new run, by reason: ended (kept "
        "after its goodbye), no_captures (never sent norms), idle (no event for "
        "--run.evict-after-seconds).", labels=["reason"])
    for reason in EVICT_REASONS:
        evicted.add_metric([reason], (snap.evicted or {}).get(reason, 0))
    yield evicted
    # Created at 0 whether CURVE is on or not, so rules can use rate() at once.
    denied = CounterMetricFamily(
        "esper_daemon_auth_denied",
        "Collector connections refused at the CURVE handshake, by reason: no_curve (a "
        "plain ZeroMQ peer), unknown_key (a key not in the authorized-keys directory), "
        "handshake (a wrong daemon key, a broken peer). Every attempt counts.",
        labels=["reason"])
    for reason in DENY_REASONS:
        denied.add_metric([reason], (snap.auth_denied or {}).get(reason, 0))
    yield denied
    http = CounterMetricFamily(
        "esper_daemon_http_refused",
        "HTTP clients turned away, by reason: max_connections (503 past "
        "--web.max-connections), write_timeout (a response not read within "
        "--web.write-timeout-seconds), unauthorized (401).", labels=["reason"])
    for reason in HTTP_REFUSAL_REASONS:
        http.add_metric([reason], (snap.http_refused or {}).get(reason, 0))
    yield http
    yield CounterMetricFamily(
        "esper_daemon_expired_runs", "Runs dropped after the TTL without events.",
        value=snap.expired_runs)
    yield CounterMetricFamily(
        "esper_daemon_ended_runs", "Runs ended because every rank said goodbye.",
        value=snap.ended_runs)
    if snap.queue_length is not None:
        yield GaugeMetricFamily(
            "esper_daemon_queue_length", "Events waiting between receiver and aggregator.",
            value=snap.queue_length)
    if snap.queue_capacity is not None:
        yield GaugeMetricFamily(
            "esper_daemon_queue_capacity",
            "Capacity of the receiver-to-aggregator queue in events.",
            value=snap.queue_capacity)
    yield InfoMetricFamily(
        "esper_daemon_build", "Daemon version and wire schema version.",
        value={"version": __version__, "schema": str(SCHEMA_VERSION)})


def process_registry() -> CollectorRegistry:
    """The process, platform and GC metrics, in a registry of the daemon's own (not the global)."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def scrape_registry(snapshot: Snapshot, process: Optional[CollectorRegistry] = None
                    ) -> CollectorRegistry:
    """What one scrape renders: the esper_* families of ``snapshot``, then ``process``'s.

    Cheap to build (two registrations); rendering it reads only ``snapshot`` and the
    process collectors, never live daemon state, so it may run off the event loop.
    """
    registry = CollectorRegistry()
    registry.register(EsperCollector(snapshot))
    if process is not None:
        registry.register(process)
    return registry
