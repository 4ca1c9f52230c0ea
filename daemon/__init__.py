"""The esper-telemetry daemon: ZeroMQ ingest, aggregation, Prometheus export (no torch)."""
