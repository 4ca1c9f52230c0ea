"""What training code reads in process: the latest completed capture."""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

__all__ = ["GroupResult", "CaptureResult", "seed_ratio"]


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

    @property
    def norm(self) -> Optional[float]:
        return None if self.sq is None else math.sqrt(self.sq)


def seed_ratio(seed: GroupResult, host: GroupResult) -> float:
    """Parameter-normalized gradient ratio ``(seed_norm / host_norm) * sqrt(host_params / seed_params)``.

    1.0 means the seed's gradient per parameter is as strong as the host's; far above 1 the
    seed dominates learning, near 0 it is starved. 0 when the host has no gradient.
    """
    if not host.sq or not seed.sq or not seed.params or not host.params:
        return 0.0
    return math.sqrt(seed.sq / host.sq) * math.sqrt(host.params / seed.params)


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
