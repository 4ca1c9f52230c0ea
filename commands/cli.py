"""``esper-telemetry``, the command line of operators and researchers: demo, top, keygen.

Exit status: 0 on success, 1 when the demo fails or its extra is not installed, or when
``top --once`` cannot read the daemon (one line on stderr says why), 2 for a usage error
(and ``top`` without a terminal), 1 when ``keygen`` cannot write its files, 130 when the
demo is interrupted. Starting the CLI imports no torch: ``demo`` imports it when it runs,
``top`` never does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# The standard library and the contract's defaults only: `top` starts fast and runs where
# torch is absent.
from . import top
from .top import DEFAULT_URL

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from esper_telemetry.version import __version__

    parser = argparse.ArgumentParser(
        prog="esper-telemetry",
        description="Gradient health of parameter groups, from the training loop to Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo",
        help="start a daemon, train a small host with two seeds, print what it exports",
        description="Start esper-telemetryd on free loopback ports, train a small host network "
        "with two seed modules with the collector attached, then scrape the daemon's "
        "/metrics and print per-group gradient norms, seed/host ratios and isolation "
        "status. The daemon is stopped at the end.",
    )
    demo.add_argument(
        "--steps", type=int, default=200, metavar="N", help="training steps (default: %(default)s)"
    )
    demo.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="torch device; 'auto' picks cuda when available, else cpu (default: %(default)s)",
    )
    demo.add_argument(
        "--run",
        default=None,
        metavar="NAME",
        help="run label in the metrics (default: demo-<random>)",
    )
    top = sub.add_parser(
        "top",
        help="live view of a daemon: per run and group, norms, ratios, isolation, drops",
        description="Watch a running esper-telemetryd from its /metrics: one row per run and group "
        "with step, gradient norm, seed/host ratio, non-finite captures, isolation state, "
        "device events, dropped events and the age of the latest capture. Violations and "
        "non-finite groups are highlighted and sorted on top. Refreshes in place; q quits. "
        "Needs neither torch nor Prometheus.",
    )
    top.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help=f"the daemon's metrics URL (default: {DEFAULT_URL})",
    )
    top.add_argument(
        "--run",
        default=None,
        metavar="NAME",
        help="show only this run (a shell-style pattern: 'exp-*')",
    )
    top.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between scrapes (default: %(default)s)",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one table without colours and exit (scripts, CI logs)",
    )
    keygen = sub.add_parser(
        "keygen",
        help="write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (0600)",
        description="Write a ZeroMQ CURVE key pair as certificate files: DIR/NAME.key holds the "
        "public key (give it to the other side: a client's goes in the daemon's "
        "--zmq.curve.authorized-keys-dir, the daemon's to every collector), "
        "DIR/NAME.key_secret the secret key, mode 0600 (keep it). Existing files are "
        "never overwritten.",
    )
    keygen.add_argument(
        "directory", metavar="DIR", help="the directory (created, mode 0700, when missing)"
    )
    keygen.add_argument("name", metavar="NAME", help="the files' name, e.g. the host or 'daemon'")
    return parser


def _keygen(args: argparse.Namespace) -> int:
    from esper_telemetry.certificates import write_key_pair

    try:
        public, secret = write_key_pair(args.directory, args.name)
    except (OSError, ValueError) as exc:
        print(f"esper-telemetry keygen: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return 0


def _top(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import math

    if not (math.isfinite(args.interval) and args.interval > 0):
        parser.error(f"--interval must be a number of seconds > 0, got {args.interval}")
    url = args.url or DEFAULT_URL
    if args.once:
        return top.run_once(
            url,
            args.run,
            timeout_s=max(1.0, min(args.interval, 10.0)),
            out=sys.stdout,
            err=sys.stderr,
        )
    return top.run_live(url, args.run, args.interval)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``esper-telemetry`` with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "top":
        return _top(parser, args)
    if args.command == "keygen":
        return _keygen(args)
    if args.steps < 1:
        _parser().error(f"--steps must be >= 1, got {args.steps}")
    # The demo runs a daemon and a training loop: without either side's extra, say which
    # one to install in one line (a daemon-only install has no torch).
    from esper_telemetry.extras import first_missing, install_hint

    missing = first_missing("demo")
    if missing is not None:
        print(f"esper-telemetry: {install_hint('the demo', missing, 'demo')}", file=sys.stderr)
        return 1
    # Imported here: torch takes seconds to load, and --help should not wait for it.
    from .demo import DemoError, run_demo

    try:
        return run_demo(steps=args.steps, device=args.device, run=args.run)
    except DemoError as exc:
        print(f"\nesper-telemetry demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nesper-telemetry demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
