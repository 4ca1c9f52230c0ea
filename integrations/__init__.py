"""One-line integrations with the trainers people use, and presets for common models.

- ``esper_telemetry.integrations.transformers.EsperCallback``: a ``transformers.TrainerCallback``.
- ``esper_telemetry.integrations.lightning.EsperCallback``: a Lightning ``Callback``.
- ``esper_telemetry.integrations.peft.peft_groups`` (also ``esper_telemetry.peft_groups``):
  the groups of a PEFT model, as keyword arguments for ``attach`` and the callbacks.

Each module imports its framework when it is imported, so nothing here is loaded unless
asked for: importing this package imports neither torch nor any trainer. The daemon and
the wire contract never import this package.
"""

from __future__ import annotations

__all__ = ["transformers", "lightning", "peft"]
