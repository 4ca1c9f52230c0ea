"""``Session``: one ``attach`` per training run, driven by a trainer's callback events.

What the trainer callbacks share: the user's ``attach`` arguments, checked when the callback
is made (an unknown name raises at once, not when training starts), attached when training
starts with the trainer's model as the root unless ``model=`` was given, a capture every
``every`` optimizer steps, and a close that runs once however training ends.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from esper_telemetry import defaults

__all__ = ["Session"]

log = logging.getLogger("esper_telemetry.integrations")

# The callbacks capture at the trainer's own point: the optimizer hooks would capture a
# second time, after clipping.
_REFUSED = {
    "optimizer": "the callback captures at the trainer's own point; optimizer= would capture again",
    "scaler": "the callback captures after the trainer's own unscaling; scaler= needs optimizer=",
}


def _attach():
    from esper_telemetry.collector.api import attach

    return attach


class Session:
    """The arguments of one callback, and the ``Telemetry`` of the run in progress (or None)."""

    def __init__(self, owner: str, every: int, attach_kwargs: dict[str, Any]) -> None:
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"{owner}: every= takes an int, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"{owner}: every must be >= 1, got {every}")
        for name, why in _REFUSED.items():
            if name in attach_kwargs:
                raise TypeError(f"{owner}: {name}= is not taken: {why}")
        attach = _attach()
        try:
            inspect.signature(attach).bind_partial(**attach_kwargs)
        except TypeError as exc:
            known = ", ".join(p for p in inspect.signature(attach).parameters if p not in _REFUSED)
            raise TypeError(
                f"{owner}: {exc}; it takes every= and the arguments of "
                f"esper_telemetry.attach: {known}"
            ) from None
        self.owner = owner
        self.every = every
        self.kwargs = dict(attach_kwargs)
        self.telemetry: Any = None

    def start(self, model: Any, run: str | None = None, clip_threshold: float | None = None) -> Any:
        """Attach (closing a previous run's collector first); ``model`` is the trainer's.

        ``run`` is the trainer's own run name, used when neither ``run=`` nor ``ESPER_RUN``
        names the run; ``clip_threshold`` the trainer's clipping threshold (None or 0: it
        does not clip), used unless ``clip_threshold=`` was given. Misuse raises here, as
        ``attach`` does.
        """
        self.close()
        kwargs = dict(self.kwargs)
        if kwargs.get("model") is None:
            if model is None:
                raise ValueError(f"{self.owner}: the trainer passed no model; give model=")
            kwargs["model"] = model
        if run and not kwargs.get("run") and not os.environ.get(defaults.ENV_RUN):
            kwargs["run"] = run
        if clip_threshold and kwargs.get("clip_threshold") is None:
            kwargs["clip_threshold"] = float(clip_threshold)
        self.telemetry = _attach()(**kwargs)
        return self.telemetry

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (from 0 or 1, as the trainer counts) is captured."""
        return self.telemetry is not None and step % self.every == 0

    def capture(self, step: int) -> None:
        """Capture now as step ``step``; never raises (``Telemetry.capture`` counts failures)."""
        if self.telemetry is not None:
            self.telemetry.capture(step)

    def close(self) -> None:
        """Flush what was captured and close; idempotent."""
        tel, self.telemetry = self.telemetry, None
        if tel is not None:
            tel.close()
