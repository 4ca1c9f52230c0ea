"""``esper-telemetry``: the training-side command line (``demo`` so far).

Exit status: 0 on success, 1 when the demo fails or its extra is not installed (one line on
stderr says why), 2 for a usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from esper_telemetry.version import __version__

    parser = argparse.ArgumentParser(
        prog="esper-telemetry",
        description="Gradient health of parameter groups, from the training loop to Prometheus.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo", help="start a daemon, train a small host with two seeds, print what it exports",
        description="Start esper-telemetryd on free loopback ports, train a small host network "
                    "with two seed modules with the collector attached, then scrape the daemon's "
                    "/metrics and print per-group gradient norms, seed/host ratios and isolation "
                    "status. The daemon is stopped at the end.")
    demo.add_argument("--steps", type=int, default=200, metavar="N",
                      help="training steps (default: %(default)s)")
    demo.add_argument("--device", default="auto", metavar="DEVICE",
                      help="torch device; 'auto' picks cuda when available, else cpu "
                           "(default: %(default)s)")
    demo.add_argument("--run", default=None, metavar="NAME",
                      help="run label in the metrics (default: demo-<random>)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``esper-telemetry`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
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
