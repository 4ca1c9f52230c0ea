"""The Prometheus text format (0.0.4), written faster than ``generate_latest``.

Same families, names, HELP/TYPE lines and values as prometheus_client's
``generate_latest`` (a test checks they parse identically); it differs only where the
format leaves freedom: labels keep the collector's order instead of being sorted, and
floats are written with Python's ``repr``. It escapes each distinct label value once per
scrape (a run's name appears in hundreds of series), which makes a scrape of 10,000
series several times cheaper.
"""

from __future__ import annotations

import math
from typing import Dict, List

from prometheus_client.registry import Collector

__all__ = ["render_text", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TYPES = {"counter": ("_total", "counter"), "info": ("_info", "gauge"),
          "stateset": ("", "gauge"), "gaugehistogram": ("", "histogram"),
          "unknown": ("", "untyped")}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


def _value(v: float) -> str:
    v = float(v)
    if v != v:
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    return repr(v)


def render_text(registry: Collector) -> bytes:
    """Every family of ``registry`` in the text format, as bytes."""
    out: List[str] = []
    escaped: Dict[str, str] = {}
    for metric in registry.collect():
        suffix, mtype = _TYPES.get(metric.type, ("", metric.type))
        mname = metric.name + suffix
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {mname} {doc}\n# TYPE {mname} {mtype}\n")
        deferred: Dict[str, List[str]] = {}
        for s in metric.samples:
            labels = s.labels
            if labels:
                parts = []
                for k, v in labels.items():
                    e = escaped.get(v)
                    if e is None:
                        e = escaped[v] = (v.replace("\\", r"\\").replace("\n", r"\n")
                                          .replace('"', r"\""))
                    parts.append(f'{k}="{e}"')
                line = f"{s.name}{{{','.join(parts)}}} {_value(s.value)}"
            else:
                line = f"{s.name} {_value(s.value)}"
            if s.timestamp is not None:
                line = f"{line} {int(float(s.timestamp) * 1000):d}"
            tail = s.name[len(metric.name):] if s.name.startswith(metric.name) else ""
            if tail in _OM_SUFFIXES:
                # OpenMetrics-only samples become their own gauge, as generate_latest does.
                deferred.setdefault(tail, []).append(line + "\n")
            else:
                out.append(line + "\n")
        for tail, lines in sorted(deferred.items()):
            name = metric.name + tail
            out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")
