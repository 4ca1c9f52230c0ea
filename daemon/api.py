"""The JSON API's documents: the runs at a glance, and a run's recent steps per group.

``runs_document`` reads the ``Snapshot`` a scrape reads (so the page and ``/metrics`` tell
one story); ``history_document`` reads ``Aggregator.history``'s ``RunHistory`` (settled
copies: nothing here touches live state, so both run on a worker thread once the loop has
taken them). ``encode`` writes compact JSON.

JSON has no Inf or NaN. A norm that was not finite travels as ``null``, like a step without
gradient, and its step is listed in the group's ``nonfinite``: a ``null`` at a step listed
there is a non-finite gradient, any other ``null`` a step without gradient. Ratios follow
their seed: ``null`` where the ratio is not finite (docs/daemon.md, "The JSON API").
"""

from __future__ import annotations

import json
from typing import Any

from esper_telemetry.ratio import seed_ratios

from .snapshot import RunSnapshot, Snapshot
from .steps import GroupHistory, RunHistory

__all__ = ["runs_document", "history_document", "encode"]

Point = tuple[int, float | None]


def _finite(x: float | None) -> float | None:
    return x if x is not None and x - x == 0.0 else None


def _run_summary(run: RunSnapshot, lost: int, now: float) -> dict[str, Any]:
    groups = run.groups
    violated = [
        g.name
        for g in groups
        if g.violation_step >= 0 and g.violation_step >= g.step  # exporter's isolation_ok == 0
    ]
    return {
        "run": run.name,
        "groups": len(groups),
        "last_step": run.last_step if run.last_step >= 0 else None,
        "age_seconds": (
            max(0.0, now - run.last_capture_time) if run.last_capture_time > 0 else None
        ),
        "captures": run.captures,
        "collectors": run.collectors,
        "ended": run.ended,
        "violations": sum(sum(g.violations.values()) for g in groups),
        "violated_groups": violated,
        "nonfinite": sum(g.nonfinite for g in groups),
        "stale_groups": [g.name for g in groups if g.stale],
        "inconsistent_groups": [g.name for g in groups if g.inconsistent is not None],
        "dropped": run.dropped,
        "lost_messages": lost,
        "device_mismatch": sum(run.device_mismatch.values()),
    }


def runs_document(snapshot: Snapshot, now: float) -> dict[str, Any]:
    """``{"time": now, "runs": [...]}``: each run's health at a glance, by name.

    ``now`` is the daemon's unix time; ``age_seconds`` is how long ago the run's latest
    capture was applied, by the daemon's clock (as ``top``'s AGE and the exported
    ``esper_last_capture_timestamp_seconds``), never by a collector's.
    """
    lost: dict[str, int] = {}
    for (run, _rank), n in (snapshot.messages_lost or {}).items():
        lost[run] = lost.get(run, 0) + n
    runs = sorted(snapshot.runs, key=lambda r: r.name)
    return {"time": now, "runs": [_run_summary(r, lost.get(r.name, 0), now) for r in runs]}


def _since(points: list[Point], since: int | None, last: int | None) -> list[Point]:
    """The points after step ``since`` (a scan from the end: new points are few), at most
    the ``last`` latest."""
    if since is not None:
        i = len(points)
        while i > 0 and points[i - 1][0] > since:
            i -= 1
        points = points[i:]
    if last is not None and len(points) > last:
        points = points[len(points) - last :]
    return points


def _clean(points: list[Point]) -> tuple[list, list[int]]:
    """The points with non-finite norms as None, and those steps."""
    bad = [s for s, n in points if n is not None and not n - n == 0.0]
    if not bad:
        return points, bad
    return [(s, n if n is None or n - n == 0.0 else None) for s, n in points], bad


def _ratios(seed: GroupHistory, points: list[Point], host: GroupHistory, at: dict) -> list:
    """``[step, ratio]`` at the steps the seed and the host both have (``at``: the host's norm
    by step), by ``seed_ratios`` of the norms squared; ``null`` where it is not finite."""
    both = [(s, n, at[s]) for s, n in points if s in at]
    ratios = seed_ratios(
        [None if n is None else n * n for _, n, _ in both],
        seed.params,
        [None if h is None else h * h for _, _, h in both],
        host.params,
    )
    if all(r - r == 0.0 for r in ratios):
        return [(s, r) for (s, _, _), r in zip(both, ratios)]
    return [(s, r if r - r == 0.0 else None) for (s, _, _), r in zip(both, ratios)]


def _group(
    g: GroupHistory, points: list[Point], nonfinite: list[int], folded_since: int | None
) -> dict[str, Any]:
    """A group's entry; ``points``: the ones sent, cleaned, ``nonfinite`` their bad steps."""
    marks = sorted(set(g.nonfinite_steps).union(nonfinite))
    folded = g.folded
    if folded_since is not None:
        folded = [f for f in folded if f[1] > folded_since]
    return {
        "name": g.name,
        "role": g.role,
        "params": g.params,
        "points": points,
        "first_step": g.points[0][0] if g.points else None,
        "nonfinite": marks,
        "violations": list(g.violation_steps),
        "folded": [(a, b, _finite(lo), _finite(hi)) for a, b, lo, hi in folded],
        "folded_from": g.folded[0][0] if g.folded else None,
        "spikes": g.spikes,
        "window": None if g.window is None else [_finite(g.window[0]), _finite(g.window[1])],
        "stale": g.stale,
        "inconsistent": g.inconsistent,
    }


def history_document(
    history: RunHistory,
    since: int | None = None,
    last: int | None = None,
    folded_since: int | None = None,
) -> dict[str, Any]:
    """A run's groups' recent steps (see the module docstring for non-finite values).

    ``since``: only the points after that step, and ``folded_since``: only the folded
    buckets whose last step is after that one (the bucket still filling grows: a client
    replaces a bucket it holds by one with the same first step), so a page that polls asks
    for what it lacks. Both are ignored, and ``since`` answered ``null`` (replace, do not
    append), when the run's latest step is below ``since`` (the collector started again
    from an earlier step). ``last``: at most that many latest points per group. Each
    group's ``first_step`` is the oldest step it keeps in full, so a client that appends
    can drop the points the daemon has folded since.
    """
    if since is not None and history.last_step < since:
        since = folded_since = None
    host = next((g for g in history.groups if g.role == "host"), None)
    if host is not None and (host.stale or host.inconsistent):
        host = None  # a ratio over numbers that mean nothing is no ratio (as exported)
    host_at: dict[int, float | None] = {}
    if host is not None:
        host_at = dict(_since(host.points, since, None))
    groups = []
    for g in history.groups:
        raw = _since(g.points, since, last)
        points, bad = _clean(raw)
        doc = _group(g, points, bad, folded_since)
        if g.role == "seed" and host is not None:
            doc["ratio"] = _ratios(g, raw, host, host_at)
        groups.append(doc)
    return {
        "run": history.run,
        "ended": history.ended,
        "last_step": history.last_step if history.last_step >= 0 else None,
        "since": since,
        "host": None if host is None else host.name,
        "groups": groups,
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def encode(doc: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON. ``allow_nan=False``: a non-finite number that slipped through is
    an error here, never invalid JSON sent to a client. A document's ``groups`` (its last
    key) are encoded one by one: the C encoder holds the GIL for a whole call, so one call
    over 128 groups x 1,024 points would stall the event loop for all of it."""
    groups = doc.get("groups")
    if not groups:
        return _dumps(doc)
    head = _dumps({**doc, "groups": []})
    assert head.endswith(b'"groups":[]}'), "groups must be the document's last key"
    return b"".join((head[:-3], b"[", b",".join(_dumps(g) for g in groups), b"]}"))
