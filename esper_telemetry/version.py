"""The version of the esper-telemetry distribution."""

__version__ = "0.1.0"
