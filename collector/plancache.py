"""The plans (and their CUDA graphs) a collector keeps, and the one rule that forgets them.

A plan depends on the gradients' layout (device, dtype, contiguity of each); its graphs of
the ``_foreach_norm`` pass depend on their addresses too. Jobs alternate between a few of
each: a seed whose gradient is None on the steps it sits out changes the layout, and
``zero_grad(set_to_none=True)`` with a capture still holding the previous gradients
alternates between address sets. The rule, here and nowhere else: at most ``PLANS``
layouts, least recently used dropped; per plan at most ``KEYS`` address sets, oldest
dropped, and a slice keeps graphs and use counts only for address sets its plan still
knows. Parameters re-bound (a move, a replaced module) drop every plan.

An address says nothing of what lies there. A plan bound to addresses is kept only while
the gradients at them still have the element counts and dtypes its kernels were built for
(``still_fits``): an in-place cast (``model.half()`` keeps the Parameter objects) or a
resized ``.data``, with the gradients re-allocated at the same addresses after
``zero_grad(set_to_none=True)``, would otherwise replay kernels built for the old dtype
(silently wrong norms) or the old element count (the pointer-table pass would read past a
tensor's end: a sticky CUDA error that ends the process).

A plan with no CUDA slice has no graphs, so no address binds it: it is kept while the same
gradients exist (``grad_presence``, one C-level pass), however often the allocator moves
them (``zero_grad(set_to_none=True)`` on the CPU gives new addresses every step). A dtype or
device changed in place (``model.double()``, ``.data`` moved) without a rebinding is not
looked at per capture: the CPU pass raises on it (``norms.tensor_squares``), and the caller
then asks again with ``refit=True``, which looks the layout up as for a new address set.
CPU-only plans are also found by which gradients exist, so a seed whose gradients come and
go every other step switches between two plans without reading every gradient's layout.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .plan import Plan, build_plan, grad_key, grad_presence, grad_signature

__all__ = ["PlanCache", "PLANS", "KEYS", "still_fits"]

PLANS = 4
KEYS = 4

_DTYPE = operator.attrgetter("dtype")
_NUMEL = torch.Tensor.numel


class PlanCache:
    """Plans by gradient layout; training thread only.

    ``on_new_layout(old, new)`` is called whenever the current plan changes to one with
    other devices (a new plan, or a known one coming back), for device events.
    """

    def __init__(
        self,
        on_new_layout: Callable[[Plan | None, Plan], None],
        pointer_tables: bool,
        cpu_shares: int = 1,
        share_rows: bool = False,
    ) -> None:
        self._on_new_layout = on_new_layout
        self._pointer_tables = pointer_tables
        self._cpu_shares = cpu_shares
        self._share_rows = share_rows
        self._plans: collections.OrderedDict[tuple[Any, ...], Plan] = collections.OrderedDict()
        self.current: Plan | None = None
        self.built = 0

    def plan_for(
        self,
        grads: list[torch.Tensor | None],
        rebound: bool,
        group_params: Sequence[Sequence[torch.Tensor]],
        sharded: list[bool],
        counts: list[int],
        counted: Sequence[bool] | None = None,
        refit: bool = False,
    ) -> Plan:
        """The plan for these gradients: the current one when it fits (the common case: one
        ``data_ptr`` per tensor with CUDA slices, which graphs bind to addresses; which
        gradients exist, without), a known one with the same layout, or a new one.

        ``refit``: the current plan was found not to fit (see the module's docstring); look
        it up by layout. ``sharded`` and ``counted`` (see ``placement``) change only with
        the parameters, and then ``rebound`` drops every plan: a plan kept is never built
        from stale ones."""
        plan = self.current
        key = None
        if plan is not None and not rebound and not refit:
            if not plan.cuda:
                present = grad_presence(grads)
                if present == plan.present:
                    return plan
                known = next(
                    (p for p in self._plans.values() if not p.cuda and p.present == present), None
                )
                if known is not None:
                    self._plans.move_to_end(known.signature)
                    if known.group_devices != plan.group_devices:
                        self._on_new_layout(plan, known)
                    self.current = known
                    return known
            else:
                key = grad_key(grads)
                if (key == plan.key or key in plan.known_keys) and still_fits(plan, grads):
                    plan.key = key
                    return plan
        if key is None:
            key = grad_key(grads)
        signature = grad_signature(grads)
        if rebound:
            self._plans.clear()  # plans of parameters no longer watched
        else:
            known = self._plans.get(signature)
            if known is not None:
                remember(known, key)
                self._plans.move_to_end(signature)
                if plan is not None and known.group_devices != plan.group_devices:
                    self._on_new_layout(plan, known)  # moved back to where it was before
                self.current = known
                return known
        new = build_plan(
            group_params,
            grads,
            key,
            signature,
            sharded,
            counts,
            counted,
            pointer_tables=self._pointer_tables,
            cpu_shares=self._cpu_shares,
            share_rows=self._share_rows,
        )
        new.numels = [sig[3] for sig in signature if sig is not None]
        new.dtypes = [sig[1] for sig in signature if sig is not None]
        self.built += 1
        self._on_new_layout(plan, new)
        self._plans[signature] = new
        if len(self._plans) > PLANS:
            self._plans.popitem(last=False)
        self.current = new
        return new


def still_fits(plan: Plan, grads: Sequence[torch.Tensor | None]) -> bool:
    """Whether the gradients found at a plan's addresses have the element counts and dtypes its
    kernels were built for (see the module's docstring).

    Two C-level passes over the gradients, about as costly as reading their addresses.
    Density is left to the signature (looked at when a plan is built or looked up): a dense
    gradient's squares are the same whatever its strides, and autograd makes every
    gradient dense (its layout contract); only one assigned by hand could be otherwise.
    """
    present = grads if len(plan.numels) == len(grads) else [g for g in grads if g is not None]
    try:
        numels = list(map(_NUMEL, present))
    except TypeError:  # None where the plan had an empty gradient: both are address 0
        return False
    return numels == plan.numels and list(map(_DTYPE, present)) == plan.dtypes


def remember(plan: Plan, key: tuple[int, ...]) -> None:
    """Make ``key`` the plan's current address set, forgetting the oldest beyond ``KEYS``."""
    if key not in plan.known_keys and len(plan.known_keys) >= KEYS:
        forget = next(iter(plan.known_keys))
        del plan.known_keys[forget]
        for s in plan.slices:
            s.graphs.pop(forget, None)
            s.seen.pop(forget, None)
    plan.known_keys[key] = None
    plan.key = key
