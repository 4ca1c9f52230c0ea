"""``python -m esper_telemetry.daemon``: the same as the ``esper-telemetryd`` console script."""

import sys

from .cli import main

sys.exit(main())
