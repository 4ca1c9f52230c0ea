"""Benchmark the daemon's ingest and scrape with real processes on loopback.

    python bench/daemon_ingest.py [--senders N] [--seconds S] [--trials T] [--unnumbered]
                                  [--no-write] [--no-floor] [--baseline TREE]

Starts ``python -m esper_telemetry.daemon`` as a subprocess, then per trial N sender processes
(each one collector's worth: its own run name and PUSH socket) send pre-encoded ``Norms`` events
(as a one-process collector writes them: a world of one, each group's fingerprint) as fast
as the daemon takes them (blocking sends: libzmq's high-water mark pushes back, so
every event sent reaches the daemon's socket). Throughput is the events the daemon
counted as accepted over the wall time from the senders' start until the daemon has
accounted for every event sent (accepted, or dropped and counted as ``queue_full``).
Loss is sent minus accounted: anything but 0 is a bug. Messages are numbered (schema 2,
as collectors send them; the pre-encoded frames cycle, which the daemon reads as a
restarted sender, never as a gap); ``--unnumbered`` sends schema 1 frames instead. Then it
fills the daemon with about 10,000 series and times scrapes over HTTP. Medians go to
bench/RESULTS.md (section "## Daemon ingest"; other sections are kept); ``--no-write`` only
prints them.

The floor is measured in the same run: a bare receiver process (one pyzmq PULL socket,
blocking receives, ``msgpack.unpackb`` with the options of ``esper_telemetry.decode``,
counting the events; no validation, no queue, no state) fed by the same sender processes
with the same frames and message counts, trial by trial interleaved with the daemon's (the
order alternating). The ratio daemon/floor of the medians is what the machine leaves on
the table: the senders share the machine with whichever receiver runs. ``--baseline TREE``
measures the daemon of another source tree (``git archive COMMIT | tar -x -C TREE``) in the
same interleaving, so a change is compared before and after in one run; its figures are
printed beside the floor's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from report import machine, write_section

from esper_telemetry import GroupDecl, GroupNorm, Hello, Norms, encode
from esper_telemetry.commands.daemon_process import DaemonProcess, DaemonStartError

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> str:
    from importlib.metadata import version

    import zmq

    return machine(
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})",
        f"msgpack {version('msgpack')}",
        f"prometheus_client {version('prometheus_client')}",
    )


SECTION = "## Daemon ingest"


# What a collector of one process sends: a world of one, and each group's fingerprint (a
# 63-bit digest of what the rank holds; collector/fingerprint.py).
_FINGERPRINTS = (0x5A3C_91E2_7B04_D1F6, 0x2E61_0B9D_C4A8_3F15, 0x7C12_E5A0_9D3B_64C8)


def _norms(run: str, step: int) -> Norms:
    host, seed0, seed1 = _FINGERPRINTS
    groups = (
        GroupNorm("host", "host", 1_000_000, 4.0 + step % 7, 0, False, False, host),
        GroupNorm("seed0", "seed", 10_000, 0.5, 0, False, True, seed0),
        GroupNorm("seed1", "seed", 10_000, 0.25, 0, False, True, seed1),
    )
    return Norms(run, 0, time.time(), step, False, groups, 1)


def _sender(
    endpoint: str, run: str, batch: int, messages: int, go, out, numbered: bool = True
) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    # Long enough for a slow receiver to take everything queued here: a sender that gave
    # up after a few seconds would drop the tail of its trial (counted as lost).
    sock.setsockopt(zmq.LINGER, 120_000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(endpoint)
    if batch == 1:
        frames = [encode(_norms(run, s), seq=s if numbered else None) for s in range(256)]
    else:
        frames = [
            encode([_norms(run, s * batch + i) for i in range(batch)], seq=s if numbered else None)
            for s in range(64)
        ]
    go.wait()
    send = sock.send
    k = len(frames)
    for i in range(messages):
        send(frames[i % k])
    out.put(messages * batch)
    sock.close()
    ctx.term()


def _floor_receiver(conn) -> None:
    """The floor: PULL + ``unpackb`` (the codec's options) + count, nothing else.

    Binds a wildcard tcp port and sends its endpoint on ``conn``; then, per trial, takes
    the number of events to expect from ``conn``, receives until it has counted them (or
    nothing came for 60 s) and answers ``(perf_counter at the last event, events counted)``.
    ``perf_counter`` is CLOCK_MONOTONIC, so the parent can subtract its own start time.
    """
    import msgpack
    import zmq

    from esper_telemetry.codec import _MAX_ARRAY_LEN, _MAX_MAP_LEN
    from esper_telemetry.defaults import MAX_STRING_CHARS

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.bind("tcp://127.0.0.1:*")
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    unpackb = msgpack.unpackb
    recv = sock.recv
    opts = dict(
        raw=False,
        use_list=False,
        strict_map_key=True,
        max_str_len=MAX_STRING_CHARS * 4,
        max_bin_len=0,
        max_ext_len=0,
        max_array_len=_MAX_ARRAY_LEN,
        max_map_len=_MAX_MAP_LEN,
    )
    while True:
        expected = conn.recv()
        if expected is None:
            break
        n = 0
        try:
            while n < expected:
                obj = unpackb(recv(), **opts)
                n += len(obj) if type(obj) is tuple else 1
        except zmq.Again:
            pass
        conn.send((time.perf_counter(), n))
    sock.close()
    ctx.term()


def _start_senders(
    endpoint: str, senders: int, batch: int, messages: int, numbered: bool
) -> tuple[list[mp.Process], mp.Queue, float]:
    """Sender processes, released together once each has connected and encoded its frames:
    the processes, the queue each puts its count of sent events on, and the start time."""
    go = mp.Event()
    out: mp.Queue = mp.Queue()
    procs = [
        mp.Process(
            target=_sender,
            args=(endpoint, f"bench-{batch}-{i}", batch, messages, go, out, numbered),
        )
        for i in range(senders)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    go.set()
    return procs, out, t0


def _floor_trial(
    floor, endpoint: str, senders: int, batch: int, messages: int, numbered: bool = True
) -> dict[str, float]:
    """One trial of the bare receiver, on the same frames and message counts."""
    expected = messages * senders * batch
    floor.send(expected)
    procs, out, t0 = _start_senders(endpoint, senders, batch, messages, numbered)
    sent = sum(out.get(timeout=300) for _ in procs)
    t_end, counted = floor.recv()
    for p in procs:
        p.join(10)
    elapsed = t_end - t0
    return {
        "sent": sent,
        "accepted": counted,
        "seconds": elapsed,
        "events_per_s": counted / elapsed,
    }


def _start_daemon(
    env: dict[str, str] | None = None, cwd: Path = ROOT
) -> tuple[subprocess.Popen, str, str]:
    """``python -m esper_telemetry.daemon`` (``env`` may point it at another tree) on loopback
    ports the kernel picks: (process, zmq endpoints, web address)."""
    try:
        d = DaemonProcess(
            "--limits.max-runs=1000",
            "--limits.max-groups-per-run=256",
            "--log.level=info",
            command=[sys.executable, "-m", "esper_telemetry.daemon"],
            env=env,
            cwd=cwd,
        )
    except DaemonStartError as exc:
        raise SystemExit(f"daemon did not start: {exc}") from None
    return d.proc, ",".join(d.endpoints), d.web.removeprefix("http://")


def _baseline_env(tree: Path) -> tuple[dict[str, str], Path]:
    """An environment, and a working directory, whose ``esper_telemetry`` is ``tree``'s (a
    checkout of another commit) laid out as the package installs it, first on
    ``PYTHONPATH`` (not the repository root: ``-m`` puts the working directory first)."""
    import shutil
    import tempfile

    site = Path(tempfile.mkdtemp(prefix="esper-baseline-"))
    import atexit

    atexit.register(shutil.rmtree, site, ignore_errors=True)
    package = site / "esper_telemetry"
    shutil.copytree(tree / "esper_telemetry", package)
    for sub in ("daemon", "collector", "integrations"):
        if (tree / sub).is_dir():
            shutil.copytree(tree / sub, package / sub)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    where = subprocess.run(
        [sys.executable, "-c", "import esper_telemetry.daemon as d; print(d.__file__)"],
        env=env,
        cwd=site,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(site)):
        raise SystemExit(f"the baseline daemon would not run from {tree}: {where}")
    return env, site


def _scrape(web: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://{web}/metrics", timeout=30) as resp:
        body = resp.read().decode()
    return body, time.perf_counter() - t0


def _value(body: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def _accounted(web: str, batch: int) -> tuple[float, float]:
    body, _ = _scrape(web)
    accepted = _value(body, "esper_daemon_events_total")
    dropped_msgs = _value(body, "esper_daemon_rejected_total", '{reason="queue_full"}')
    return accepted, dropped_msgs * batch


def _messages(rate_guess: float, seconds: float, senders: int, batch: int) -> int:
    """Messages per sender for a trial of about ``seconds`` at ``rate_guess`` events/s."""
    return max(1, int(rate_guess * seconds / senders / batch))


def _trial(
    endpoint: str, web: str, senders: int, batch: int, messages: int, numbered: bool = True
) -> dict[str, float]:
    base_acc, base_drop = _accounted(web, batch)
    procs, out, t0 = _start_senders(endpoint, senders, batch, messages, numbered)
    # Scrape as little as possible while the daemon ingests: a scrape costs it CPU time.
    # The senders' sends only block at the high-water marks, so they may finish long
    # before the daemon has taken everything: poll at intervals sized to the work left at
    # the rate seen so far, closing in to 10 ms near the end.
    sent = sum(out.get(timeout=300) for _ in procs)
    deadline = time.perf_counter() + 60
    while True:
        acc, drop = _accounted(web, batch)
        acc -= base_acc
        drop -= base_drop
        now = time.perf_counter()
        if acc + drop >= sent or now > deadline:
            break
        rate = (acc + drop) / (now - t0)
        left_s = (sent - acc - drop) / rate if rate > 0 else 0.0
        time.sleep(min(1.0, max(0.01, 0.5 * left_s)))
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join(10)
    return {
        "sent": sent,
        "accepted": acc,
        "dropped_counted": drop,
        "lost_uncounted": sent - acc - drop,
        "seconds": elapsed,
        "events_per_s": acc / elapsed,
    }


def _fill_series(endpoint: str, runs: int, groups: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    for r in range(runs):
        run = f"scrape-{r}"
        decls = tuple(
            GroupDecl(
                f"g{g:03d}",
                "host" if g == 0 else ("seed" if g <= 19 else "group"),
                1000 + g,
                0 < g <= 19,
            )
            for g in range(groups)
        )
        sock.send(encode(Hello(run, 0, time.time(), 1, "bench", os.getpid(), "0", "", decls)))
        gn = tuple(
            GroupNorm(d.name, d.role, d.params, 1.0 + i, 0, False, d.isolated)
            for i, d in enumerate(decls)
        )
        sock.send(encode(Norms(run, 0, time.time(), 1, False, gn)))
    sock.close()
    ctx.term()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="target length of a trial")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="events per batched message")
    ap.add_argument(
        "--unnumbered",
        action="store_true",
        help="send schema 1 frames (no message numbers), as older collectors",
    )
    ap.add_argument(
        "--no-write", action="store_true", help="print the section, leave bench/RESULTS.md as it is"
    )
    ap.add_argument(
        "--no-floor", action="store_true", help="skip the bare receiver (the floor) and the ratio"
    )
    ap.add_argument(
        "--baseline",
        metavar="TREE",
        help="also measure the daemon of another source tree (a checkout of "
        "another commit, e.g. from `git worktree add`), interleaved with "
        "this one's: before and after a change from one run (printed, "
        "not written)",
    )
    args = ap.parse_args()

    floor = None
    floor_proc = None
    floor_endpoint = ""
    if not args.no_floor:
        floor, child = mp.Pipe()
        floor_proc = mp.Process(target=_floor_receiver, args=(child,), daemon=True)
        floor_proc.start()
        floor_endpoint = floor.recv()

    base_env = _baseline_env(Path(args.baseline)) if args.baseline else None
    daemon, endpoint, web = _start_daemon()
    baseline = None
    try:
        if base_env is not None:
            baseline = _start_daemon(*base_env)
        results: dict[str, list[dict[str, float]]] = {}
        floors: dict[str, list[dict[str, float]]] = {}
        baselines: dict[str, list[dict[str, float]]] = {}
        for mode, batch, guess in (("batched", args.batch, 300_000), ("single", 1, 120_000)):
            numbered = not args.unnumbered
            # Warm-up, twice (a daemon's first trial of a mode runs cold); the second sizes
            # the trials to about --seconds of the daemon's time.
            for _ in range(2):
                w = _trial(
                    endpoint,
                    web,
                    args.senders,
                    batch,
                    _messages(guess, 0.5, args.senders, batch),
                    numbered,
                )
            messages = _messages(max(w["events_per_s"], guess), args.seconds, args.senders, batch)
            if floor is not None:
                _floor_trial(
                    floor,
                    floor_endpoint,
                    args.senders,
                    batch,
                    _messages(guess, 0.5, args.senders, batch),
                    numbered,
                )
            if baseline is not None:
                _trial(
                    baseline[1],
                    baseline[2],
                    args.senders,
                    batch,
                    _messages(guess, 0.5, args.senders, batch),
                    numbered,
                )
            runs: list[dict[str, float]] = []
            floor_runs: list[dict[str, float]] = []
            base_runs: list[dict[str, float]] = []
            who_all = (
                ["daemon"]
                + (["floor"] if floor is not None else [])
                + (["baseline"] if baseline is not None else [])
            )
            for t in range(args.trials):
                # Interleaved, the order rotating: drift on the shared machine hits all.
                order = who_all[t % len(who_all) :] + who_all[: t % len(who_all)]
                for who in order:
                    if who == "floor":
                        f = _floor_trial(
                            floor, floor_endpoint, args.senders, batch, messages, numbered
                        )
                        floor_runs.append(f)
                        print(
                            f"{mode:8s} trial {t}: floor    {f['events_per_s']:>9,.0f} "
                            f"events/s, counted {f['accepted']:,.0f} of {f['sent']:,.0f}",
                            flush=True,
                        )
                        continue
                    at = (endpoint, web) if who == "daemon" else baseline[1:]
                    r = _trial(at[0], at[1], args.senders, batch, messages, numbered)
                    (runs if who == "daemon" else base_runs).append(r)
                    print(
                        f"{mode:8s} trial {t}: {who:8s} {r['events_per_s']:>9,.0f} events/s, "
                        f"sent {r['sent']:,.0f}, dropped (counted) "
                        f"{r['dropped_counted']:,.0f}, lost (uncounted) "
                        f"{r['lost_uncounted']:,.0f}",
                        flush=True,
                    )
            results[mode] = runs
            floors[mode] = floor_runs
            baselines[mode] = base_runs

        _fill_series(endpoint, runs=21, groups=100)
        time.sleep(1.0)
        body, _ = _scrape(web)
        series = sum(1 for ln in body.splitlines() if ln and not ln.startswith("#"))
        times = [_scrape(web)[1] for _ in range(20)]
        scrape_ms = statistics.median(times) * 1e3
        print(f"scrape: {series} series, median {scrape_ms:.1f} ms (min {min(times) * 1e3:.1f})")
    finally:
        daemon.terminate()
        rc = daemon.wait(30)
        if baseline is not None:
            baseline[0].terminate()
            baseline[0].wait(30)
        if floor is not None:
            floor.send(None)
            floor_proc.join(10)
    print(f"daemon exit status after SIGTERM: {rc}")

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    def each(mode: str, table: dict[str, list[dict[str, float]]] = results) -> str:
        return ", ".join(f"{r['events_per_s']:,.0f}" for r in table[mode])

    floor_rows = ""
    floor_note = ""
    if floor is not None:
        fmed = {m: statistics.median(r["events_per_s"] for r in floors[m]) for m in floors}
        ratio = {m: med(m, "events_per_s") / fmed[m] for m in fmed}
        short = sum(r["sent"] - r["accepted"] for rs in floors.values() for r in rs)
        for m in fmed:
            print(
                f"{m}: daemon {med(m, 'events_per_s'):,.0f} events/s, floor "
                f"{fmed[m]:,.0f} events/s, ratio {ratio[m]:.2f}"
            )
            if baselines.get(m):
                bmed = statistics.median(r["events_per_s"] for r in baselines[m])
                print(
                    f"{m}: baseline daemon ({args.baseline}) {bmed:,.0f} events/s, ratio "
                    f"{bmed / fmed[m]:.2f}; all trials {each(m, baselines)}"
                )
        floor_rows = (
            f"| floor, batched: bare PULL + `unpackb` on the same frames | "
            f"{fmed['batched']:,.0f} events/s | - |\n"
            f"| floor, single-event messages | {fmed['single']:,.0f} events/s | - |\n"
            f"| daemon / floor, batched | {ratio['batched']:.2f} | >= 0.7 |\n"
            f"| daemon / floor, single-event messages | {ratio['single']:.2f} | >= 0.7 |\n"
        )
        floor_note = (
            f"Floor trials, events/s: batched {each('batched', floors)}; single "
            f"{each('single', floors)}; events the bare receiver did not count (all trials): "
            f"{short:,.0f}. The floor is a bare receiver process (one PULL socket, "
            f"`msgpack.unpackb` with the codec's options, counting events: no validation, no "
            f"state) fed by the same senders, frames and message counts, interleaved trial by "
            f"trial with the daemon.\n\n"
        )

    lost = sum(r["lost_uncounted"] for rs in results.values() for r in rs)
    dropped = sum(r["dropped_counted"] for rs in results.values() for r in rs)
    section = (
        f"{SECTION}\n\n"
        f"`python bench/daemon_ingest.py` ({time.strftime('%Y-%m-%d')}). Machine: {_machine()}.\n"
        "The daemon (`python -m esper_telemetry.daemon`, default queue) and "
        f"{args.senders} sender processes (one run each, blocking PUSH over tcp loopback, "
        "`Norms` events of 3 groups as a one-process collector sends them: world 1, fingerprints) "
        "share the machine. "
        f"Medians of {args.trials} trials of about {args.seconds:g} s.\n\n"
        f"| measure | median | target |\n|---|---|---|\n"
        f"| batched messages ({args.batch} events each) | "
        f"{med('batched', 'events_per_s'):,.0f} events/s | >= 200,000 |\n"
        f"| single-event messages | {med('single', 'events_per_s'):,.0f} events/s "
        f"| >= 100,000 |\n"
        f"| events lost and not counted (all trials) | {lost:,.0f} | 0 |\n"
        f"| events dropped and counted as queue_full (all trials) | {dropped:,.0f} | - |\n"
        f"| scrape over HTTP of {series:,} series | {scrape_ms:.1f} ms | <= 100 ms |\n"
        f"{floor_rows}"
        f"| exit status after SIGTERM | {rc} | 0 |\n\n"
        f"All trials, events/s: batched {each('batched')}; single {each('single')}. "
        f"The daemon's main thread is CPU-bound; the machine is shared with other work, so "
        f"trials vary.\n\n"
        f"{floor_note}"
    )
    print(section)
    if not args.no_write:
        write_section(SECTION, section)
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
