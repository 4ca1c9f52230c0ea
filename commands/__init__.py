"""``esper-telemetry``, the operator's and researcher's command line: ``demo``, ``top``, ``keygen``.

Nothing here runs inside a training process: ``top`` reads a daemon's /metrics (no torch,
no Prometheus), ``demo`` starts a daemon and a small training loop, ``keygen`` writes CURVE
certificates. ``daemon_process`` is the one way to start ``esper-telemetryd`` as a child
process, for the demo, the tests and the benchmarks.
"""
