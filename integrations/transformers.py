"""``EsperCallback`` for the Hugging Face ``transformers.Trainer``: one line in ``callbacks=``.

    from esper_telemetry.integrations.transformers import EsperCallback
    trainer = Trainer(..., callbacks=[EsperCallback(**et.peft_groups(model))])

Where it captures. A step's gradients are final once the last micro-batch of the
accumulation window has gone backward (under DDP: all-reduced), the Trainer has unscaled
them (fp16 under accelerate) and before it clips them. In transformers 5.24 the Trainer does
both inside one call, ``accelerator.clip_grad_norm_`` (unscale, then clip in place), and its
first callback event after that, ``on_pre_optimizer_step``, sees the gradients *clipped*
("after gradient clipping", says its docstring). No callback event sits between unscaling
and clipping. So at train begin the callback finds the Trainer that called it (its frame;
checked by its callback list containing this callback) and wraps, on that Trainer's
accelerator instance only and until train end, ``unscale_gradients``: accelerate calls it at
the start of every ``clip_grad_norm_``, also with ``max_grad_norm=0`` (the Trainer then
measures its own ``grad_norm`` with ``clip_grad_norm_(..., inf)``), and the capture happens
right after it returns, on optimizer steps only (``accelerator.sync_gradients``). The
training stream is fenced by ``capture()`` itself, so the clipping that follows cannot race
the norm pass. Where accelerate never calls it (DeepSpeed clips inside its engine; the
Trainer's own mixed-mesh DTensor path) or no Trainer is found, the capture falls back to
``on_pre_optimizer_step``: after unscaling, but after clipping when ``max_grad_norm > 0``
(every group then scaled by the same factor: ratios unchanged, a non-finite group makes
every group non-finite); the log says so once.

The step of a capture is the Trainer's ``state.global_step`` after the step (what it logs
that step's loss and ``grad_norm`` under). Rank and world size come from
``torch.distributed`` (the Trainer's distributed launch initializes it before training).
The run name: ``run=``, else ``ESPER_RUN``, else ``TrainingArguments.run_name``, else as
``attach`` picks it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "esper_telemetry.integrations.transformers needs 'transformers', which is not "
        "installed: pip install transformers",
        name=exc.name,
    ) from exc

from .session import Session

__all__ = ["EsperCallback"]

log = logging.getLogger("esper_telemetry.integrations")

# How far up the stack the Trainer's frame may be: Trainer._inner_training_loop ->
# CallbackHandler.on_train_begin -> CallbackHandler.call_event -> here, with room to spare.
_MAX_FRAMES = 12


class EsperCallback(TrainerCallback):
    """Attach on train begin, capture once per optimizer step, close on train end.

    Takes ``every=`` (capture every N optimizer steps, default 1) and the keyword arguments
    of ``esper_telemetry.attach`` (groups as there, or ``**esper_telemetry.peft_groups(model)``);
    without ``model=``, dotted paths resolve under the Trainer's model. ``optimizer=`` and
    ``scaler=`` are refused: the callback drives the captures. Unknown arguments raise here;
    the rest of ``attach``'s checks raise when training starts.
    """

    def __init__(self, *, every: int = 1, **attach_kwargs: Any) -> None:
        self._session = Session("EsperCallback", every, attach_kwargs)
        self._state: Any = None
        self._captured: int | None = None  # the global_step whose gradients were captured
        self._unhook: Callable[[], None] | None = None
        self.capture_point: str | None = None  # "unscale_gradients" or "on_pre_optimizer_step"

    @property
    def telemetry(self) -> Any:
        """The ``Telemetry`` of the training in progress, or None outside ``trainer.train()``."""
        return self._session.telemetry

    # -- Trainer events ---------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self._remove_hook()
        self._session.start(
            model,
            run=getattr(args, "run_name", None),
            clip_threshold=getattr(args, "max_grad_norm", None),
        )
        self._state = state
        self._captured = None
        self.capture_point = None
        trainer = _calling_trainer(self)
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and callable(getattr(accelerator, "unscale_gradients", None)):
            self._unhook = _wrap_unscale(accelerator, self._after_unscale)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._captured == state.global_step:
            return
        if self.capture_point is None:
            self.capture_point = "on_pre_optimizer_step"
            if args.max_grad_norm and args.max_grad_norm > 0:
                log.info(
                    "esper-telemetry: capturing in on_pre_optimizer_step, after the Trainer "
                    "clipped the gradients to max_grad_norm=%s (accelerate's unscale_gradients "
                    "was not called)",
                    args.max_grad_norm,
                )
        self._capture(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hook()
        self._session.close()
        self._state = None

    # -- the capture --------------------------------------------------------------------------
    def _after_unscale(self, accelerator: Any) -> None:
        """Right after the Trainer's accelerator unscaled the gradients, before any clipping."""
        state = self._state
        if state is None or not accelerator.sync_gradients or self._captured == state.global_step:
            return
        self.capture_point = "unscale_gradients"
        self._capture(state)

    def _capture(self, state: Any) -> None:
        self._captured = state.global_step
        step = state.global_step + 1
        if self._session.due(step):
            self._session.capture(step)

    def _remove_hook(self) -> None:
        unhook, self._unhook = self._unhook, None
        if unhook is not None:
            unhook()


def _calling_trainer(callback: Any) -> Any:
    """The Trainer whose callback handler is calling ``callback`` now, or None.

    Callback events carry the model and the optimizer, not the Trainer; the only way to its
    accelerator is the caller's frame. Found by what it holds, not by its class, so
    subclasses of ``Trainer`` (TRL's, a user's) are found too.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return obj
        frame = frame.f_back
    return None


def _wrap_unscale(accelerator: Any, after: Callable[[Any], None]) -> Callable[[], None]:
    """Call ``after(accelerator)`` each time ``accelerator.unscale_gradients`` returns.

    The wrapper is an attribute of this accelerator instance only; the returned function
    removes it (restoring whatever instance attribute was there before). A failure in
    ``after`` is logged once and never reaches the training loop.
    """
    previous = vars(accelerator).get("unscale_gradients")
    original = accelerator.unscale_gradients
    failed = []

    def unscale_gradients(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            after(accelerator)
        except Exception as exc:  # never into the training loop
            if not failed:
                failed.append(exc)
                log.warning(
                    "esper-telemetry: capture after unscale_gradients failed: %s: %s "
                    "(training goes on)",
                    type(exc).__name__,
                    exc,
                )
        return result

    accelerator.unscale_gradients = unscale_gradients

    def unhook() -> None:
        if vars(accelerator).get("unscale_gradients") is unscale_gradients:
            if previous is None:
                del accelerator.unscale_gradients
            else:
                accelerator.unscale_gradients = previous

    return unhook
