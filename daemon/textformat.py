"""The two exposition formats, written faster than prometheus_client's encoders, and the
negotiation between them: the daemon's one renderer (``exporter.Scrape.render`` writes its
run rows with ``header``, ``value`` and ``escape_label``, and every other family with
``render_families``).

The Prometheus text format (0.0.4) and OpenMetrics 1.0.0 carry the same samples here: the
daemon never writes exemplars, units or timestamps, so a sample line is the same in both
(``name{labels} value``, counters' samples ending in ``_total``). They differ in the
family headers (text names a counter's family ``x_total``, OpenMetrics ``x``; an info
family is a gauge in text), in HELP escaping (OpenMetrics escapes ``"`` too), in where an
OpenMetrics-only ``_created`` sample goes (text makes it a gauge of its own, as
``generate_latest`` does), and in OpenMetrics' closing ``# EOF``. Both keep the
collector's label order instead of sorting, write floats with Python's ``repr`` (``+Inf``,
``-Inf``, ``NaN`` spelled as both formats want), and escape each distinct label value once
per scrape (a run's name appears in hundreds of series). Tests check that both formats
parse to the same families with prometheus_client's parsers (OpenMetrics with its strict
one), that ``render_families`` writes what prometheus_client's own encoders write for the
same families, and that the text passes ``promtool check metrics``; promtool 2.42 lints only
the text format (it reads an OpenMetrics counter family, named without ``_total``, as
having no HELP).

``negotiate`` picks the format from an ``Accept`` header by its q-values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "render_families",
    "header",
    "negotiate",
    "value",
    "escape_label",
    "TEXT",
    "OPENMETRICS",
    "CONTENT_TYPE",
    "OPENMETRICS_CONTENT_TYPE",
    "CONTENT_TYPES",
    "EOF",
]

TEXT = "text"
OPENMETRICS = "openmetrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
CONTENT_TYPES = {TEXT: CONTENT_TYPE, OPENMETRICS: OPENMETRICS_CONTENT_TYPE}
EOF = "# EOF\n"

# Text format: (suffix of the family's name in HELP/TYPE, type written) by metric type.
_TYPES = {
    "counter": ("_total", "counter"),
    "info": ("_info", "gauge"),
    "stateset": ("", "gauge"),
    "gaugehistogram": ("", "histogram"),
    "unknown": ("", "untyped"),
}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


def value(v: float) -> str:
    """A sample value as both formats spell it."""
    v = float(v)
    if v != v:
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    return repr(v)


def escape_label(v: str) -> str:
    """A label value escaped for both formats (backslash, double quote, newline)."""
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def header(name: str, mtype: str, doc: str, fmt: str) -> str:
    """The HELP and TYPE lines of a family named ``name`` (a counter's without ``_total``)."""
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    if fmt == OPENMETRICS:
        return f"# HELP {name} {doc.replace(chr(34), chr(92) + chr(34))}\n# TYPE {name} {mtype}\n"
    suffix, ttype = _TYPES.get(mtype, ("", mtype))
    return f"# HELP {name}{suffix} {doc}\n# TYPE {name}{suffix} {ttype}\n"


def render_families(
    metrics: Iterable, fmt: str, escaped: dict[str, str] | None = None
) -> list[str]:
    """The exposition of prometheus_client ``Metric`` objects, as a list of strings.

    Refuses (``ValueError``) what the daemon never writes and these encoders do not: exemplars
    and native histograms.
    """
    out: list[str] = []
    if escaped is None:
        escaped = {}
    om = fmt == OPENMETRICS
    for metric in metrics:
        out.append(header(metric.name, metric.type, metric.documentation, fmt))
        deferred: dict[str, list[str]] = {}
        for s in metric.samples:
            if s.exemplar is not None or getattr(s, "native_histogram", None) is not None:
                raise ValueError(f"{s.name}: exemplars and native histograms are not written")
            labels = s.labels
            if labels:
                parts = []
                for k, v in labels.items():
                    e = escaped.get(v)
                    if e is None:
                        e = escaped[v] = escape_label(v)
                    parts.append(f'{k}="{e}"')
                line = f"{s.name}{{{','.join(parts)}}} {value(s.value)}"
            else:
                line = f"{s.name} {value(s.value)}"
            if s.timestamp is not None:
                if om:
                    line = f"{line} {float(s.timestamp)!r}"
                else:
                    line = f"{line} {int(float(s.timestamp) * 1000):d}"
            tail = s.name[len(metric.name) :] if s.name.startswith(metric.name) else ""
            if not om and tail in _OM_SUFFIXES:
                # OpenMetrics-only samples become their own gauge, as generate_latest does.
                deferred.setdefault(tail, []).append(line + "\n")
            else:
                out.append(line + "\n")
        for tail, lines in sorted(deferred.items()):
            out.append(header(metric.name + tail, "gauge", metric.documentation, fmt))
            out.extend(lines)
    return out


def _media_ranges(accept: str) -> Iterable[tuple[str, dict[str, str]]]:
    for item in accept.split(","):
        mtype, *params = item.split(";")
        mtype = mtype.strip().lower()
        if not mtype:
            continue
        p: dict[str, str] = {}
        for param in params:
            k, _, v = param.partition("=")
            p[k.strip().lower()] = v.strip().strip('"')
        yield mtype, p


def _q(params: dict[str, str]) -> float:
    try:
        q = float(params.get("q", "1"))
    except ValueError:
        return 0.0
    return q if 0.0 <= q <= 1.0 else 0.0


def negotiate(accept: str | None) -> tuple[str, str]:
    """The format to answer an ``Accept`` header with, and its content type.

    Each format takes the q-value of the most specific media range that matches it (RFC
    9110: ``application/openmetrics-text`` of version 1.0.0 or unversioned for OpenMetrics;
    ``text/plain`` for text; then ``application/*`` or ``text/*``; then ``*/*``). The higher
    q wins; a tie, or a header that accepts neither (or none), gets text, which every
    client parses.
    """
    best: dict[str, tuple[int, float]] = {}  # fmt -> (specificity, q)

    def offer(fmt: str, specificity: int, q: float) -> None:
        if specificity > best.get(fmt, (-1, 0.0))[0]:
            best[fmt] = (specificity, q)

    for mtype, params in _media_ranges(accept or ""):
        q = _q(params)
        if mtype == "application/openmetrics-text":
            if params.get("version", "1.0.0") == "1.0.0":
                offer(OPENMETRICS, 2, q)
        elif mtype == "text/plain":
            offer(TEXT, 2, q)
        elif mtype == "application/*":
            offer(OPENMETRICS, 1, q)
        elif mtype == "text/*":
            offer(TEXT, 1, q)
        elif mtype == "*/*":
            offer(OPENMETRICS, 0, q)
            offer(TEXT, 0, q)
    om_q = best.get(OPENMETRICS, (0, 0.0))[1]
    text_q = best.get(TEXT, (0, 0.0))[1]
    fmt = OPENMETRICS if om_q > text_q else TEXT
    return fmt, CONTENT_TYPES[fmt]
