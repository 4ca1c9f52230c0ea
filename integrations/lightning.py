"""``EsperCallback`` for Lightning: one line in ``Trainer(callbacks=...)``.

    from esper_telemetry.integrations.lightning import EsperCallback
    trainer = L.Trainer(..., callbacks=[EsperCallback(seeds={"head": "head"})])

Lightning calls ``on_before_optimizer_step`` once per optimizer step, after the closure ran
the accumulation window's last backward, after its precision plugin unscaled the
gradients (16-mixed with a GradScaler) and before it clips them
(``gradient_clip_val``): exactly where the gradients are final, so the capture happens
there. ``capture()`` fences the training stream itself, so the clipping that follows cannot
race the norm pass.

Attaches in ``on_train_start`` (the model is on its device and the strategy, DDP or FSDP,
set up; rank and world size come from ``torch.distributed``), with the LightningModule as
the root of dotted paths unless ``model=`` is given; closes in ``on_train_end``, and in
``on_exception`` when training fails. The step of a capture is ``trainer.global_step`` at
that moment (optimizer steps done before this one: the step Lightning logs it under).

The base class is ``lightning.pytorch.Callback`` when the ``lightning`` package is
installed, else ``pytorch_lightning.Callback``; Lightning calls callback hooks by name, so
either works with either trainer.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError(
            "esper_telemetry.integrations.lightning needs 'lightning' (or "
            "'pytorch-lightning'), which is not installed: pip install lightning",
            name="lightning",
        ) from exc

from .session import Session

__all__ = ["EsperCallback"]


class EsperCallback(Callback):
    """Attach on train start, capture in ``on_before_optimizer_step``, close on train end.

    Takes ``every=`` (capture every N optimizer steps, default 1) and the keyword arguments
    of ``esper_telemetry.attach`` (groups as there, or ``**esper_telemetry.peft_groups(module)``);
    without ``model=``, dotted paths resolve under the LightningModule. ``optimizer=`` and
    ``scaler=`` are refused: the callback drives the captures. Unknown arguments raise here;
    the rest of ``attach``'s checks raise when training starts.
    """

    def __init__(self, *, every: int = 1, **attach_kwargs: Any) -> None:
        super().__init__()
        self._session = Session("EsperCallback", every, attach_kwargs)

    @property
    def telemetry(self) -> Any:
        """The ``Telemetry`` of the training in progress, or None outside ``trainer.fit()``."""
        return self._session.telemetry

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Norm clipping only: a clip by value bounds entries, not the norm.
        by_norm = getattr(trainer, "gradient_clip_algorithm", "norm") in (None, "norm")
        clip = getattr(trainer, "gradient_clip_val", None) if by_norm else None
        self._session.start(pl_module, clip_threshold=clip)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        if self._session.due(step):
            self._session.capture(step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._session.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._session.close()
