"""From what the collector saw to events on the wire and the in-process result.

``Reporter`` builds every event one collector sends (hello, norms, isolation violations,
device conditions) and the ``CaptureResult`` training code reads. It runs on the
completion thread (norms) and on the training thread (device and structural events); it
only builds records and hands them to the publisher's queue, which is thread safe.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Collection, Sequence

import torch

from esper_telemetry.events import (
    DeviceMismatch,
    GroupDecl,
    GroupNorm,
    Hello,
    IsolationViolation,
    Norms,
)
from esper_telemetry.ratio import seed_ratio
from esper_telemetry.version import __version__

from .fingerprint import Holding
from .groups import GroupSpec
from .plan import Plan
from .publisher import Publisher
from .results import CaptureResult, GroupResult

__all__ = ["Reporter"]


class Reporter:
    """Events of one collector (``run``, ``rank``) about its groups ``specs``."""

    def __init__(
        self,
        publisher: Publisher,
        specs: Sequence[GroupSpec],
        run: str,
        rank: int,
        world_size: int,
        isolation_threshold: float,
        clip_threshold: float | None = None,
    ) -> None:
        self._publisher = publisher
        self.clip_threshold = clip_threshold
        self._specs = list(specs)
        self.run, self.rank, self.world_size = run, rank, world_size
        self._threshold_sq = isolation_threshold**2
        self._host = next((i for i, s in enumerate(self._specs) if s.role == "host"), None)
        # Device conditions already reported, so each is sent once per change.
        self._reported: dict[tuple[str, str], tuple[str, ...]] = {}

    def hello(self, counts: Sequence[int], holding: Holding | None = None) -> None:
        """Announce the collector and its groups: with ``holding``, each group's fingerprint
        and the elements this rank counts of it (else ``counts``, the logical counts)."""
        if holding is not None:
            counts = holding.counted
        fingerprints = holding.fingerprints if holding is not None else (None,) * len(counts)
        pieces = holding.pieces if holding is not None else ((),) * len(counts)
        decls = tuple(
            GroupDecl(s.name, s.role, c, s.isolated, f, p)
            for s, c, f, p in zip(self._specs, counts, fingerprints, pieces)
        )
        self._publisher.publish(
            Hello(
                self.run,
                self.rank,
                time.time(),
                self.world_size,
                socket.gethostname()[:256],
                os.getpid(),
                __version__,
                torch.__version__,
                decls,
                self.clip_threshold,
            )
        )

    def norms(
        self,
        step: int,
        time_s: float,
        skipped: bool,
        plan: Plan,
        sq_row: Sequence[float],
        nf_row: Sequence[float],
        stale: frozenset[str] = frozenset(),
        holding: Holding | None = None,
    ) -> CaptureResult:
        """Publish one completed capture (and its isolation violations); the in-process result.

        ``stale``: groups that can no longer be followed, marked so in the result.
        ``holding``: what this rank counts of each group (``fingerprint.py``), as the wire
        carries it: each group's fingerprint, its ``params`` the elements counted here.
        """
        results: dict[str, GroupResult] = {}
        wire: list[GroupNorm] = []
        for gi, spec in enumerate(self._specs):
            has = plan.has_grad[gi]
            sq = sq_row[gi] if has else None
            r = GroupResult(
                spec.name,
                spec.role,
                plan.group_params[gi],
                sq,
                int(nf_row[gi]),
                has,
                plan.sharded[gi],
                spec.isolated,
                spec.name in stale,
            )
            results[spec.name] = r
            wire.append(
                GroupNorm(
                    spec.name,
                    spec.role,
                    r.params if holding is None else holding.counted[gi],
                    sq,
                    r.nonfinite,
                    r.sharded,
                    spec.isolated,
                    None if holding is None else holding.fingerprints[gi],
                )
            )
        ratios: dict[str, float] = {}
        if self._host is not None:
            host = results[self._specs[self._host].name]
            # A local contribution over another is no ratio of the groups' norms: left out.
            ratios = {
                r.name: seed_ratio(r.sq, r.params, host.sq, host.params)
                for r in results.values()
                if r.role == "seed" and not (r.local or host.local)
            }
        self._publisher.publish(
            Norms(self.run, self.rank, time_s, step, skipped, tuple(wire), self.world_size)
        )
        for r in results.values():
            if r.isolated and r.sq is not None and (r.nonfinite or not r.sq <= self._threshold_sq):
                norm = r.norm
                self._publisher.publish(
                    IsolationViolation(
                        self.run,
                        self.rank,
                        time_s,
                        step,
                        r.name,
                        "gradient",
                        f"isolated group received gradient (norm {norm:.3g}, "
                        f"{r.nonfinite} non-finite tensors)",
                        norm if norm is not None and math.isfinite(norm) else None,
                    )
                )
        return CaptureResult(step, time_s, self.rank, skipped, results, ratios)

    def structural(self, step: int, name: str, evidence: str) -> None:
        self._publisher.publish(
            IsolationViolation(
                self.run, self.rank, time.time(), step, name, "structural", evidence, None
            )
        )

    def layout(
        self, old: Plan | None, new: Plan, rebound: Sequence[int], stale: Collection[str] = ()
    ) -> None:
        """Device events for a new plan, each condition once: split, mixed, and moved.

        ``rebound``: groups whose parameters were re-bound since the last plan (reported as
        moved even when the devices are the same). ``stale``: groups reported stale, never
        moved (a move tells the daemon the group is followed again).
        """
        host_devices = new.group_devices[self._host] if self._host is not None else ()
        for gi, spec in enumerate(self._specs):
            devices = new.group_devices[gi]
            state = {
                "split": devices if len(devices) > 1 else (),
                "mixed": devices
                if (
                    spec.role == "seed"
                    and host_devices
                    and devices
                    and set(devices) != set(host_devices)
                )
                else (),
            }
            for kind, value in state.items():
                if value and self._reported.get((kind, spec.name)) != value:
                    self.device(kind, spec.name, value)
                self._reported[(kind, spec.name)] = value
            # Re-bound before the first plan (between attach and the first capture) too.
            if spec.name in stale:
                continue
            if gi in rebound or (old is not None and old.group_devices[gi] != devices):
                self.device("moved", spec.name, devices)

    def device(self, kind: str, group: str, devices: Sequence[str]) -> None:
        """A device condition of ``group``: split, mixed, moved, or stale (no longer followed)."""
        self._publisher.publish(
            DeviceMismatch(self.run, self.rank, time.time(), kind, group, tuple(devices))
        )
