"""``esper-telemetry top``: a live terminal view of a daemon's ``/metrics``.

One row per run and group: step, gradient norm, seed/host ratio, non-finite captures,
isolation state, device events, dropped events, the age of the latest capture and a
sparkline of the recent norms (from the daemon's history API); groups
with an isolation violation are highlighted and sorted on top, then those with non-finite
gradients, no longer followed (``stale``) or whose ranks contradict each other
(``inconsistent``: the daemon withholds their norm).
``--once`` prints one plain table and exits (scripts, CI logs); otherwise the view
refreshes in place (curses) until ``q``.

It reads the daemon's text exposition over HTTP with the standard library only: no torch,
no prometheus_client, nothing of the daemon, so it runs anywhere the CLI is installed. A
daemon that is down or answers something that is not an esper-telemetryd exposition gets
one line saying so, and the live view keeps retrying. The sparklines come from
``api/v1/runs/<run>/history`` next to the metrics URL (one request per shown run and
refresh); where that fails (an older daemon, a proxy that serves only /metrics) the
column reads ``-`` and the rest of the table is unchanged.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from esper_telemetry import defaults

__all__ = [
    "DEFAULT_URL",
    "ExpositionError",
    "FetchError",
    "Row",
    "parse_exposition",
    "build_rows",
    "format_table",
    "fetch",
    "fetch_trends",
    "sparkline",
    "run_once",
    "run_live",
]

DEFAULT_URL = f"http://127.0.0.1:{defaults.DEFAULT_WEB_PORT}{defaults.DEFAULT_WEB_TELEMETRY_PATH}"
MAX_BODY_BYTES = 64 * 1024 * 1024  # a scrape of 10,000 series is about 1 MB

Labels = dict[str, str]
Samples = dict[str, list[tuple[Labels, float]]]


class ExpositionError(ValueError):
    """The body is not a Prometheus text exposition (the message says where)."""


class FetchError(Exception):
    """The metrics URL could not be read or did not hold an esper-telemetryd exposition; one
    line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # whatever the cause said, on one line


# -- the text format ---------------------------------------------------------------------------
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*\"")
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


def _labels(line: str, i: int, where: str) -> tuple[Labels, int]:
    """The label set starting after ``{`` at ``i``; returns it and the index after ``}``."""
    labels: Labels = {}
    while True:
        while i < len(line) and line[i] in " \t":
            i += 1
        if i < len(line) and line[i] == "}":
            return labels, i + 1
        m = _LABEL.match(line, i)
        if m is None:
            raise ExpositionError(f"{where}: bad label at column {i + 1}")
        i = m.end()
        value: list[str] = []
        while True:
            if i >= len(line):
                raise ExpositionError(f"{where}: unterminated label value")
            c = line[i]
            if c == "\\":
                if i + 1 >= len(line) or line[i + 1] not in _UNESCAPE:
                    raise ExpositionError(f"{where}: bad escape in a label value")
                value.append(_UNESCAPE[line[i + 1]])
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                value.append(c)
                i += 1
        labels[m.group(1)] = "".join(value)
        while i < len(line) and line[i] in " \t":
            i += 1
        if i < len(line) and line[i] == ",":
            i += 1
        elif i >= len(line) or line[i] != "}":
            raise ExpositionError(f"{where}: expected ',' or '}}' at column {i + 1}")


def parse_exposition(text: str, prefix: str = "esper_") -> Samples:
    """``{sample name: [(labels, value), ...]}`` of the samples whose name starts with ``prefix``.

    Every line is checked enough to refuse what is not the text format (an HTML page, a
    JSON error): ``ExpositionError`` names the first bad line. Other metrics' label sets
    are not decoded.
    """
    out: Samples = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {n}"
        m = _NAME.match(line)
        if m is None:
            raise ExpositionError(f"{where}: not a metric sample: {line[:60]!r}")
        name, i = m.group(), m.end()
        mine = name.startswith(prefix)
        labels: Labels = {}
        if i < len(line) and line[i] == "{":
            if mine:
                labels, i = _labels(line, i + 1, where)
            else:
                end = line.rfind("}")
                if end < i:
                    raise ExpositionError(f"{where}: unterminated label set")
                i = end + 1
        rest = line[i:].split()
        if not 1 <= len(rest) <= 2 or (i < len(line) and line[i] not in " \t"):
            raise ExpositionError(f"{where}: expected a value after {name!r}")
        try:
            value = float(rest[0])
            if len(rest) == 2:
                int(rest[1])
        except ValueError:
            raise ExpositionError(f"{where}: {rest[0]!r} is not a number") from None
        if mine:
            out.setdefault(name, []).append((labels, value))
    return out


# -- rows ----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One group of one run as the daemon exports it; None where it exports nothing."""

    run: str
    group: str
    step: float | None
    norm: float | None
    has_gradient: float | None
    ratio: float | None
    nonfinite: float
    isolation_ok: float | None
    violations: float
    device_events: float
    dropped: float
    last_capture: float | None  # unix time, by the collector's clock
    stale: bool = False  # the collector can no longer follow the group
    inconsistent: bool = False  # the ranks contradict its latest step: no norm exported
    ended: bool = False  # every rank of the run said goodbye: final values
    trend: str = "-"  # a sparkline of the recent norms; "-" when the history is unknown
    window_max: float | None = None  # the largest finite norm of the daemon's window
    spikes: float = 0.0  # captures the daemon counted as spikes

    @property
    def violated(self) -> bool:
        return self.isolation_ok == 0

    @property
    def unhealthy(self) -> bool:
        """A violation, non-finite gradients (now or before), a group that is no longer
        followed, or one whose ranks contradict each other."""
        return (
            self.violated
            or self.nonfinite > 0
            or self.stale
            or self.inconsistent
            or (self.norm is not None and not math.isfinite(self.norm))
        )


def _by(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """Series of ``name`` keyed by the values of ``keys``; series sharing a key are summed."""
    out: dict[tuple[str, ...], float] = {}
    for labels, value in samples.get(name, ()):
        key = tuple(labels.get(k, "") for k in keys)
        out[key] = out.get(key, 0.0) + value
    return out


def build_rows(samples: Samples, run: str | None = None) -> list[Row]:
    """Rows for every group of every run (``run``: a name or shell-style pattern), worst first.

    Worst: an isolation violation, then non-finite gradients (most first), a stale or an
    inconsistent group; then by run and group name.
    """
    rg = ("run", "group")
    norm = _by(samples, "esper_grad_norm", *rg)
    has = _by(samples, "esper_group_has_gradient", *rg)
    params = _by(samples, "esper_group_parameters", *rg)
    nonfinite = _by(samples, "esper_grad_nonfinite_total", *rg)
    iso = _by(samples, "esper_isolation_ok", *rg)
    stale = _by(samples, "esper_group_stale", *rg)
    inconsistent = _by(samples, "esper_group_inconsistent", *rg)
    violations = _by(samples, "esper_isolation_violations_total", *rg)
    ratio = _by(samples, "esper_seed_grad_ratio", "run", "seed")
    step = _by(samples, "esper_last_step", "run")
    last = _by(samples, "esper_last_capture_timestamp_seconds", "run")
    device = _by(samples, "esper_device_mismatch_total", "run")
    dropped = _by(samples, "esper_collector_dropped_events_total", "run")
    ended = _by(samples, "esper_run_ended", "run")
    window_max = _by(samples, "esper_grad_norm_max", *rg)
    spikes = _by(samples, "esper_grad_norm_spikes_total", *rg)
    keys = set(norm) | set(has) | set(params) | set(nonfinite) | set(iso)
    if run is not None:
        keys = {k for k in keys if fnmatch.fnmatchcase(k[0], run)}
    rows = [
        Row(
            run=r,
            group=g,
            step=step.get((r,)),
            norm=norm.get((r, g)),
            has_gradient=has.get((r, g)),
            ratio=ratio.get((r, g)),
            nonfinite=nonfinite.get((r, g), 0.0),
            isolation_ok=iso.get((r, g)),
            violations=violations.get((r, g), 0.0),
            device_events=device.get((r,), 0.0),
            dropped=dropped.get((r,), 0.0),
            last_capture=last.get((r,)),
            stale=stale.get((r, g), 0.0) > 0,
            inconsistent=inconsistent.get((r, g), 0.0) > 0,
            ended=ended.get((r,), 0.0) > 0,
            window_max=window_max.get((r, g)),
            spikes=spikes.get((r, g), 0.0),
        )
        for r, g in keys
    ]
    rows.sort(key=lambda w: (not w.violated, not w.unhealthy, -w.nonfinite, w.run, w.group))
    return rows


# -- the table -----------------------------------------------------------------------------------
HEADER = (
    "RUN",
    "GROUP",
    "STEP",
    "NORM",
    "RATIO",
    "MAX",
    "SPIKES",
    "NONFINITE",
    "ISOLATION",
    "DEVICE",
    "DROPS",
    "AGE",
    "TREND",
)
_RIGHT = {2, 3, 4, 5, 6, 7, 9, 10, 11}


def _count(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _age(last: float | None, now: float) -> str:
    if last is None:
        return "-"
    s = max(0.0, now - last)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def cells(row: Row, now: float) -> tuple[str, ...]:
    """The row's table cells, as text without spaces (so a script can split on whitespace)."""
    if row.stale:
        norm = "stale"
    elif row.inconsistent:
        norm = "inconsistent"
    elif row.norm is not None:
        norm = f"{row.norm:.6g}"
    elif row.has_gradient == 0:
        norm = "no-grad"
    else:
        norm = "-"
    if row.isolation_ok is None:
        isolation = "-" if not row.violations else f"violations={row.violations:.0f}"
    elif row.violated:
        isolation = f"VIOLATED({row.violations:.0f})"
    else:
        isolation = "ok"
    return (
        row.run,
        row.group,
        _count(row.step),
        norm,
        "-" if row.ratio is None else f"{row.ratio:.4g}",
        "-" if row.window_max is None else f"{row.window_max:.6g}",
        f"{row.spikes:.0f}",
        f"{row.nonfinite:.0f}",
        isolation,
        f"{row.device_events:.0f}",
        f"{row.dropped:.0f}",
        f"ended({_age(row.last_capture, now)})" if row.ended else _age(row.last_capture, now),
        row.trend,
    )


def format_table(rows: Iterable[Row], now: float) -> list[tuple[str, str | None]]:
    """The header and one line per row, each with its highlight: "violation", "warning" or None."""
    body = [
        (cells(r, now), "violation" if r.violated else "warning" if r.unhealthy else None)
        for r in rows
    ]
    widths = [
        max(len(line[i]) for line in (HEADER, *(b for b, _ in body))) for i in range(len(HEADER))
    ]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in _RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
        ).rstrip()

    return [(fmt(HEADER), "header"), *((fmt(b), style) for b, style in body)]


def summary(url: str, samples: Samples, rows: list[Row]) -> str:
    """One line: where, the daemon's version, how many runs and groups, and how many are unwell."""
    version = next(
        (labels.get("version", "?") for labels, _ in samples.get("esper_daemon_build_info", ())),
        "?",
    )
    runs = len({r.run for r in rows})
    bad = sum(r.violated for r in rows)
    warnings = sum(r.unhealthy and not r.violated for r in rows)
    rejected = sum(v for _, v in samples.get("esper_daemon_rejected_total", ()))
    return (
        f"{url}  esper-telemetryd {version}  runs={runs} groups={len(rows)} violated={bad} "
        f"warnings={warnings} rejected={rejected:.0f}"
    )


# -- sparklines ---------------------------------------------------------------------------------
SPARK_WIDTH = 16  # characters
SPARK_STEPS = 256  # the latest steps a sparkline reads: 16 per character
_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(
    points: list[tuple[int, float | None]], nonfinite: Iterable[int] = (), width: int = SPARK_WIDTH
) -> str:
    """The norms as block characters, oldest left, on a log scale from their smallest to
    their largest: each character is the largest norm of its share of the steps (a spike
    stays visible), ``!`` where a step was non-finite, ``·`` where no step had a gradient."""
    if not points:
        return "-"
    bad = set(nonfinite)
    per = -(-len(points) // width)  # ceil
    cols: list[float | str] = []
    for i in range(0, len(points), per):
        chunk = points[i : i + per]
        if any(step in bad for step, _ in chunk):
            cols.append("!")
            continue
        finite = [v for _, v in chunk if v is not None and math.isfinite(v)]
        cols.append(max(finite) if finite else "·")
    logs = [math.log10(v) for v in cols if isinstance(v, float) and v > 0]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
    out = []
    for v in cols:
        if isinstance(v, str):
            out.append(v)
        elif v <= 0:
            out.append(_BLOCKS[0])
        elif hi - lo < 1e-12:
            out.append(_BLOCKS[3])
        else:
            out.append(_BLOCKS[round((math.log10(v) - lo) / (hi - lo) * (len(_BLOCKS) - 1))])
    return "".join(out)


# -- reading the daemon --------------------------------------------------------------------------
def fetch(url: str, timeout_s: float) -> Samples:
    """The esper samples at ``url``; ``FetchError`` with a one-line reason otherwise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise FetchError(
            f"cannot reach {url}: {getattr(exc.reason, 'strerror', None) or exc.reason}"
        ) from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        raise FetchError(f"cannot read {url}: {exc}") from None
    if len(body) > MAX_BODY_BYTES:
        raise FetchError(
            f"{url} answered more than {MAX_BODY_BYTES} bytes: not an esper-telemetryd exposition"
        )
    try:
        samples = parse_exposition(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise FetchError(
            f"{url} answered bytes that are not UTF-8 text: not a metrics exposition"
        ) from None
    except ExpositionError as exc:
        raise FetchError(f"{url} did not answer a metrics exposition ({exc})") from None
    if "esper_daemon_build_info" not in samples:
        raise FetchError(
            f"{url} answered metrics without esper_daemon_build_info: not an esper-telemetryd"
        )
    return samples


def api_bases(url: str) -> list[str]:
    """Where the history API may be, given the metrics URL: next to it (a proxy's prefix
    kept: ``http://h/esper/metrics`` -> ``http://h/esper/api/v1/``), then at the root."""
    parts = urllib.parse.urlsplit(url)
    root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/api/v1/", "", ""))
    near = urllib.parse.urljoin(urllib.parse.urlunsplit((*parts[:3], "", "")), "api/v1/")
    return [near] if near == root else [near, root]


def _history(base: str, run: str, timeout_s: float) -> dict:
    url = f"{base}runs/{urllib.parse.quote(run, safe='')}/history?last={SPARK_STEPS}"
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body = resp.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise ValueError("history too large")
    doc = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise ValueError("not a history document")
    return doc


def fetch_trends(url: str, runs: Iterable[str], timeout_s: float) -> dict[tuple[str, str], str]:
    """A sparkline per (run, group) of ``runs``, from one history request per run; a run
    whose history cannot be read has none (its rows keep ``-``). Never raises."""
    trends: dict[tuple[str, str], str] = {}
    bases = api_bases(url)
    deadline = time.monotonic() + timeout_s
    for run in sorted(set(runs)):
        for base in list(bases):
            left = deadline - time.monotonic()
            if left <= 0:
                return trends
            try:
                doc = _history(base, run, min(left, timeout_s))
            except urllib.error.HTTPError as exc:
                if exc.code == 404 and len(bases) > 1:
                    continue  # no API here (an older daemon), or not this run: try the root
                break
            except (OSError, ValueError):
                break
            if base != bases[0]:
                bases.remove(base)
                bases.insert(0, base)  # ask where it answered first next time
            for g in doc["groups"]:
                try:
                    points = [(int(p[0]), p[1]) for p in g["points"]]
                    trends[(run, str(g["name"]))] = sparkline(points, g.get("nonfinite") or ())
                except (KeyError, TypeError, ValueError, IndexError):
                    continue
            break
    return trends


def with_trends(rows: list[Row], trends: dict[tuple[str, str], str]) -> list[Row]:
    """``rows`` with their sparklines set (``-`` where there is none)."""
    for r in rows:
        r.trend = trends.get((r.run, r.group), "-")
    return rows


def run_once(url: str, run: str | None, timeout_s: float, out: IO[str], err: IO[str]) -> int:
    """Print one table (no colours) and return 0; 1 with one line on ``err`` if the daemon
    can't be read."""
    try:
        samples = fetch(url, timeout_s)
    except FetchError as exc:
        print(f"esper-telemetry top: {exc}", file=err)
        return 1
    rows = build_rows(samples, run)
    with_trends(rows, fetch_trends(url, {r.run for r in rows}, timeout_s))
    out.write(summary(url, samples, rows) + "\n")
    if not rows:
        out.write("no runs" + (f" matching {run!r}" if run else "") + "\n")
    else:
        out.write("\n".join(line for line, _ in format_table(rows, time.time())) + "\n")
    out.flush()
    return 0


# -- the live view -------------------------------------------------------------------------------
class Poller:
    """Fetches in a background thread every ``interval_s``, so a slow daemon never delays ``q``:
    the exposition, then the history of each run shown (``run``: the view's filter)."""

    def __init__(
        self,
        url: str,
        interval_s: float,
        fetcher: Callable[[str, float], Samples] = fetch,
        run: str | None = None,
        trends: Callable[[str, Iterable[str], float], dict] = fetch_trends,
    ) -> None:
        self.url, self.interval_s, self._fetch = url, interval_s, fetcher
        self._run, self._trends = run, trends
        self.trends: dict[tuple[str, str], str] = {}  # sparklines of the latest good scrape
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.samples: Samples | None = None  # the latest good scrape
        self.good_at: float | None = None  # when it was taken
        self.error: str | None = None  # why the latest attempt failed, or None
        self.version = 0  # bumped after every attempt
        self._thread = threading.Thread(target=self._loop, name="esper-top-poller", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            timeout_s = max(1.0, min(self.interval_s, 10.0))
            trends: dict[tuple[str, str], str] = {}
            try:
                samples, error = self._fetch(self.url, timeout_s), None
            except FetchError as exc:
                samples, error = None, str(exc)
            except Exception as exc:  # a bug must not kill the view silently
                samples, error = None, " ".join(f"{type(exc).__name__}: {exc}".split())
            if samples is not None:
                try:
                    runs = {r.run for r in build_rows(samples, self._run)}
                    trends = self._trends(self.url, runs, timeout_s)
                except Exception:  # sparklines are a garnish: the table goes on without them
                    trends = {}
            with self._lock:
                if samples is not None:
                    self.samples, self.good_at = samples, time.time()
                    self.trends = trends
                self.error = error
                self.version += 1
            self._stop.wait(self.interval_s)

    def snapshot(self) -> tuple[int, Samples | None, float | None, str | None, dict]:
        with self._lock:
            return self.version, self.samples, self.good_at, self.error, self.trends

    def stop(self) -> None:
        self._stop.set()


def run_live(url: str, run: str | None, interval_s: float) -> int:
    """The refreshing view until ``q`` (or Ctrl-C); 0, or 2 with one line when there is no
    terminal."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("esper-telemetry top: not a terminal; use --once to print one table", file=sys.stderr)
        return 2
    import curses

    # The terminal's own size: ncurses prefers COLUMNS/LINES when set, and a value exported
    # earlier (or inherited by a tmux server) would pin the view to it, resizes included.
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    poller = Poller(url, interval_s, run=run)
    try:
        curses.wrapper(_view, poller, url, run, interval_s)
    except KeyboardInterrupt:
        pass
    except curses.error as exc:
        print(
            f"esper-telemetry top: the terminal cannot be driven ({exc}); use --once",
            file=sys.stderr,
        )
        return 2
    finally:
        poller.stop()
    return 0


def _view(screen, poller: Poller, url: str, run: str | None, interval_s: float) -> None:
    import curses

    styles: dict[str | None, int] = {
        None: curses.A_NORMAL,
        "header": curses.A_BOLD | curses.A_UNDERLINE,
        "violation": curses.A_BOLD | curses.A_REVERSE,
        "warning": curses.A_BOLD,
        "error": curses.A_BOLD,
    }
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    if curses.has_colors():
        curses.start_color()
        try:
            curses.use_default_colors()
            background = -1
        except curses.error:
            background = curses.COLOR_BLACK
        curses.init_pair(1, curses.COLOR_WHITE, curses.COLOR_RED)
        curses.init_pair(2, curses.COLOR_YELLOW, background)
        curses.init_pair(3, curses.COLOR_RED, background)
        styles["violation"] = curses.color_pair(1) | curses.A_BOLD
        styles["warning"] = curses.color_pair(2) | curses.A_BOLD
        styles["error"] = curses.color_pair(3) | curses.A_BOLD
    screen.timeout(100)  # getch waits at most 0.1 s: q is answered at once
    drawn_at, drawn_version = 0.0, -1
    while True:
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        version, samples, good_at, error, trends = poller.snapshot()
        now = time.time()
        # Redraw on news, on a resize, and twice a second (the ages move).
        if version == drawn_version and key != curses.KEY_RESIZE and now - drawn_at < 0.5:
            continue
        drawn_at, drawn_version = now, version
        _draw(screen, styles, url, run, interval_s, samples, good_at, error, now, trends)


def _draw(screen, styles, url, run, interval_s, samples, good_at, error, now, trends) -> None:
    import curses

    height, width = screen.getmaxyx()
    lines: list[tuple[str, str | None]] = []
    rows = with_trends(build_rows(samples, run), trends) if samples is not None else []
    if samples is not None:
        lines.append((summary(url, samples, rows) + f"  updated {_age(good_at, now)} ago", None))
    else:
        lines.append((f"{url}  esper-telemetry top", None))
    status = (
        f"{error}; retrying every {interval_s:g}s"
        if error
        else f"refresh {interval_s:g}s" + (f"  run={run}" if run else "") + "  q: quit"
    )
    lines.append((status, "error" if error else None))
    if samples is not None:
        if rows:
            lines.extend(format_table(rows, now))
        else:
            lines.append(("no runs" + (f" matching {run!r}" if run else ""), None))
    elif error is None:
        lines.append(("waiting for the first scrape...", None))
    screen.erase()
    shown = lines[:height]
    if len(lines) > height and height > 0:
        shown[-1] = (
            f"... {len(lines) - height + 1} more rows (enlarge the terminal or use --run)",
            None,
        )
    for y, (text, style) in enumerate(shown):
        try:
            screen.addnstr(y, 0, text, max(0, width - 1), styles.get(style, curses.A_NORMAL))
        except curses.error:
            pass
    screen.refresh()
