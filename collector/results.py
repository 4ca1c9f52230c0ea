"""What training code reads in process: the latest completed capture."""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

__all__ = ["GroupResult", "CaptureResult"]


class GroupResult(NamedTuple):
    """One group in one capture.

    ``sq`` is the sum of squared gradient entries this rank holds (None: no gradient),
    ``norm`` its square root; ``nonfinite`` counts tensors holding NaN or Inf; ``params``
    counts the group's scalars; ``sharded`` means ``sq`` is this rank's share only.
    """

    name: str
    role: str
    params: int
    sq: Optional[float]
    nonfinite: int
    has_grad: bool
    sharded: bool
    isolated: bool
    stale: bool = False   # the group can no longer be followed: its numbers mean nothing

    @property
    def norm(self) -> Optional[float]:
        return None if self.sq is None else math.sqrt(self.sq)


class CaptureResult(NamedTuple):
    """One completed capture: ``groups`` by name, ``ratios`` by seed name (when a host exists)."""

    step: int
    time: float
    rank: int
    skipped: bool
    groups: Dict[str, GroupResult]
    ratios: Dict[str, float]

    def __getitem__(self, name):  # type: ignore[override]
        """``result["host"]`` is the host's GroupResult; integer indexing stays a tuple's."""
        if isinstance(name, str):
            return self.groups[name]
        return tuple.__getitem__(self, name)
