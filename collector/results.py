"""What training code reads in process: the latest completed capture."""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["GroupResult", "CaptureResult"]


class GroupResult(NamedTuple):
    """One group in one capture.

    ``sq`` is the sum of squared gradient entries this rank holds (None: no gradient, or
    none that can be measured now, such as a ``Partial`` DTensor gradient, when
    ``has_grad`` is False too), ``norm`` its square root; ``nonfinite`` counts tensors
    holding NaN or Inf (every tensor this rank holds); ``params`` counts the group's
    scalars (global, for DTensors).

    For a sharded group (``sharded``, and ``local``), ``sq`` is this rank's contribution:
    its shards' squares, with each replicated element counted on one rank only, so the sum
    over all ranks of one step is the group's (what the daemon reports). It is not the
    group's norm on its own.
    """

    name: str
    role: str
    params: int
    sq: float | None
    nonfinite: int
    has_grad: bool
    sharded: bool
    isolated: bool
    stale: bool = False  # the group can no longer be followed: its numbers mean nothing

    @property
    def norm(self) -> float | None:
        return None if self.sq is None else math.sqrt(self.sq)

    @property
    def local(self) -> bool:
        """True when ``sq`` is only this rank's contribution (a sharded group's)."""
        return self.sharded


class CaptureResult(NamedTuple):
    """One completed capture: ``groups`` by name, ``ratios`` by seed name (when a host exists)."""

    step: int
    time: float
    rank: int
    skipped: bool
    groups: dict[str, GroupResult]
    ratios: dict[str, float]

    def __getitem__(self, name):  # type: ignore[override]
        """``result["host"]`` is the host's GroupResult; integer indexing stays a tuple's."""
        if isinstance(name, str):
            return self.groups[name]
        return tuple.__getitem__(self, name)
