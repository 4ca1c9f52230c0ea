"""Captures driven by the optimizer (and a GradScaler) instead of explicit ``capture()`` calls.

Gradients are final in the optimizer's step pre-hook (clipped, unscaled), so the capture
happens there and the training stream's fence in the post-hook: the norm pass overlaps
the optimizer step, and the fence still comes before anything can write the gradients
again. GradScaler changes two things:
- a step it skips (an Inf or NaN was found) usually never calls ``optimizer.step()``, only
  ``scaler.update()``: the capture happens there and is marked skipped;
- an optimizer that handles the scale itself (fused Adam/AdamW: GradScaler sets its
  ``found_inf``, and ``grad_scale`` unless the user unscaled already) is stepped even when
  the step is skipped, and skips inside its kernel. Whether it skipped is ``found_inf``, a
  tensor on the device: it travels with the capture and is read by the completion thread,
  never here. With ``grad_scale`` set the optimizer unscales the gradients in place during
  its step, so the capture moves to the post-hook (fenced at once); on a skipped step it
  leaves them scaled, and the completion thread divides the squares by the scale squared.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from .eager import eager

__all__ = ["StepHooks", "Driver", "Amp"]

# (found_inf, grad_scale or None): the tensors GradScaler hands a fused optimizer; the scale
# is given only when the captured gradients are still scaled on a skipped step.
Amp = tuple[Any, Any | None]


class Driver:
    """What the hooks need from the collector; ``Telemetry`` implements it."""

    step: int  # the step the next capture is

    def capture_step(
        self, step: int, fence: bool, skipped: bool, amp: Amp | None = None
    ) -> None: ...  # pragma: no cover

    def fence_pending(self) -> None: ...  # pragma: no cover

    def report_error(self, exc: BaseException) -> None: ...  # pragma: no cover


class StepHooks:
    """The optimizer's pre/post step hooks and the scaler's ``update`` wrapper, every
    ``every`` steps."""

    def __init__(self, driver: Driver, optimizer: Any, scaler: Any, every: int) -> None:
        self._driver: Callable[[], Driver | None] = weakref.ref(driver)  # type: ignore[assignment]
        self._every = every
        self._stepped = False  # optimizer.step() ran since the last scaler.update()
        self._deferred: tuple[int, Amp] | None = None  # a capture moved to the post-hook
        self._scaler = scaler
        pre = lambda opt, args, kwargs: eager(StepHooks._pre_step, self, opt, args, kwargs)  # noqa: E731
        post = lambda opt, args, kwargs: eager(StepHooks._post_step, self, opt, args, kwargs)  # noqa: E731
        self._handles: list[Any] = [optimizer.register_step_pre_hook(pre)]
        try:
            self._handles.append(optimizer.register_step_post_hook(post))
            if scaler is not None:
                self._wrap_scaler(scaler)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Unhook from the optimizer and the scaler; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._scaler is not None and "update" in vars(self._scaler):
            del self._scaler.update
        self._scaler = None

    def _due(self, driver: Driver) -> int | None:
        """This optimizer step's number when a capture is due; else the step is counted and None."""
        step = driver.step
        if step % self._every != 0:
            driver.step = step + 1
            return None
        return step

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        driver = self._driver()
        if driver is None:
            return
        self._stepped = True
        step = self._due(driver)
        if step is None:
            return
        found_inf = getattr(optimizer, "found_inf", None)
        grad_scale = getattr(optimizer, "grad_scale", None)
        if found_inf is not None and grad_scale is not None:
            self._deferred = (step, (found_inf, grad_scale))  # unscaled in place by the step
        else:
            driver.capture_step(
                step,
                fence=False,
                skipped=False,
                amp=None if found_inf is None else (found_inf, None),
            )

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        driver = self._driver()
        if driver is None:
            return
        if self._deferred is not None:
            (step, amp), self._deferred = self._deferred, None
            driver.capture_step(step, fence=True, skipped=False, amp=amp)
        try:
            driver.fence_pending()
        except Exception as exc:
            driver.report_error(exc)

    def _wrap_scaler(self, scaler: Any) -> None:
        original = scaler.update
        hooks = weakref.ref(self)

        def update(*args: Any, **kwargs: Any) -> Any:
            eager(_before_update, hooks())
            return original(*args, **kwargs)

        scaler.update = update


def _before_update(hooks: StepHooks | None) -> None:
    """A step GradScaler skipped never reached the optimizer: capture it, marked skipped."""
    driver = hooks._driver() if hooks is not None else None
    if hooks is None or driver is None:
        return
    if not hooks._stepped:
        step = hooks._due(driver)
        if step is not None:
            driver.capture_step(step, fence=True, skipped=True)
    hooks._stepped = False
