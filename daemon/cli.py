"""``esper-telemetryd``: parse the configuration, set up logging, run the daemon.

Exit status: 0 after a graceful stop or a valid ``--check-config``; 2 for invalid
configuration; 1 when startup fails (an address in use or unusable) or a stage fails;
128 + the signal number when a second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Sequence

from .app import serve
from .config import ConfigError, parse_args
from .logs import setup_logging

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        config = parse_args(argv)
    except ConfigError as exc:
        print(f"esper-telemetryd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if config.check_config:
        print("esper-telemetryd: configuration is valid", file=sys.stderr)
        return 0
    logger = setup_logging(config.log_level, fmt=config.log_format)
    raise_fd_limit(logger)
    return asyncio.run(serve(config, logger))


def raise_fd_limit(logger: logging.Logger) -> int:
    """Raise the soft limit on open files to the hard one, as Go's runtime does for
    Prometheus and its exporters: every collector and every scrape holds a descriptor, and
    at the limit new ones cannot connect (and libzmq's listener spins on its failed accept).
    Returns the limit, which the exporter shows as ``process_max_fds``; a failure to raise it
    is a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
