"""``esper-telemetryd``: parse the configuration, set up logging, run the daemon.

Exit status: 0 after a graceful stop or a valid ``--check-config``; 2 for invalid
configuration; 1 when startup fails (an address in use or unusable) or a stage fails;
128 + the signal number when a second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Optional, Sequence

from .app import serve
from .config import ConfigError, parse_args
from .logs import setup_logging

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    return asyncio.run(serve(config, logger))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
