"""Captures driven by the optimizer (and a GradScaler) instead of explicit ``capture()`` calls.

Gradients are final in the optimizer's step pre-hook (clipped, unscaled), so the capture
happens there and the training stream's fence in the post-hook: the norm pass overlaps
the optimizer step, and the fence still comes before anything can write the gradients
again. Two exceptions:
- an optimizer that GradScaler hands the loss scale to (``grad_scale`` set: fused Adam and
  AdamW) unscales the gradients in place inside its own step, so its capture moves to the
  post-hook, fenced at once;
- a step GradScaler skips (an Inf or NaN was found) never calls ``optimizer.step()``, only
  ``scaler.update()``: the capture happens there and is marked skipped.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, List, Optional

__all__ = ["StepHooks", "Driver"]


class Driver:
    """What the hooks need from the collector; ``Telemetry`` implements it."""

    step: int    # the step the next capture is

    def capture_step(self, step: int, fence: bool, skipped: bool) -> None: ...  # pragma: no cover

    def fence_pending(self) -> None: ...  # pragma: no cover

    def report_error(self, exc: BaseException) -> None: ...  # pragma: no cover


class StepHooks:
    """The optimizer's pre/post step hooks and the scaler's ``update`` wrapper, every ``every`` steps."""

    def __init__(self, driver: Driver, optimizer: Any, scaler: Any, every: int) -> None:
        self._driver: Callable[[], Optional[Driver]] = weakref.ref(driver)  # type: ignore[assignment]
        self._every = every
        self._stepped = False                # optimizer.step() ran since the last scaler.update()
        self._deferred: Optional[int] = None  # a capture moved to the post-hook
        self._scaler = scaler
        self._handles: List[Any] = [optimizer.register_step_pre_hook(self._pre_step)]
        try:
            self._handles.append(optimizer.register_step_post_hook(self._post_step))
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

    def _due(self, driver: Driver) -> Optional[int]:
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
        if getattr(optimizer, "grad_scale", None) is not None:
            self._deferred = step   # the fused step unscales in place: capture after it
        else:
            driver.capture_step(step, fence=False, skipped=False)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        driver = self._driver()
        if driver is None:
            return
        if self._deferred is not None:
            step, self._deferred = self._deferred, None
            driver.capture_step(step, fence=True, skipped=False)
        try:
            driver.fence_pending()
        except Exception as exc:
            driver.report_error(exc)

    def _wrap_scaler(self, scaler: Any) -> None:
        original = scaler.update
        hooks = weakref.ref(self)

        def update(*args: Any, **kwargs: Any) -> Any:
            self_ = hooks()
            driver = self_._driver() if self_ is not None else None
            if self_ is not None and driver is not None:
                if not self_._stepped:
                    step = self_._due(driver)
                    if step is not None:
                        driver.capture_step(step, fence=True, skipped=True)
                self_._stepped = False
            return original(*args, **kwargs)

        scaler.update = update
