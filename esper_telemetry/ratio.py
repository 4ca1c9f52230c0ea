"""The seed/host gradient ratio, defined once for the collector (in process) and the daemon.

Sums of squares go in, so a caller never takes a square root it does not need; the ratio
is the same whichever side computes it.
"""

from __future__ import annotations

import math

__all__ = ["seed_ratio", "seed_ratios"]


def seed_ratio(
    seed_sq: float | None,
    seed_params: int | None,
    host_sq: float | None,
    host_params: int | None,
) -> float:
    """``(seed_norm / host_norm) * sqrt(host_params / seed_params)``, from sums of squares.

    1.0 means the seed's gradient per parameter is as strong as the host's; far above 1 the
    seed dominates learning, near 0 it is starved. A seed without gradient (``None``) has
    norm 0. The ratio is 0 when it is undefined: the host has no gradient or a zero norm,
    or either parameter count is zero or unknown.

    Non-finite sums (a gradient holding Inf or NaN) never read as a starved seed: a seed
    at +Inf gives +Inf (whatever the host, unless the host is non-finite too), NaN on
    either side gives NaN, and +Inf over +Inf is NaN. A finite seed over a host at +Inf
    gives 0, as the arithmetic does.
    """
    seed_nonfinite = seed_sq is not None and not seed_sq < math.inf  # +Inf or NaN
    host_nonfinite = host_sq is not None and not host_sq < math.inf
    if seed_nonfinite or (host_nonfinite and host_sq != host_sq):
        if seed_sq == math.inf and not host_nonfinite:
            return math.inf
        return math.nan  # NaN on either side, or Inf over Inf
    if host_sq is None or host_sq <= 0.0 or not host_params or not seed_params:
        return 0.0
    return math.sqrt((seed_sq or 0.0) / host_sq) * math.sqrt(host_params / seed_params)


def seed_ratios(
    seed_sqs: list[float | None],
    seed_params: int | None,
    host_sqs: list[float | None],
    host_params: int | None,
) -> list[float]:
    """``seed_ratio`` at many steps at once (the history API's 128 groups x 1,024 steps): the
    same arithmetic, with the common case (both sums finite, the host's above zero, both
    counts known) inline and every other case handed to ``seed_ratio`` itself."""
    if not host_params or not seed_params:
        return [seed_ratio(s, seed_params, h, host_params) for s, h in zip(seed_sqs, host_sqs)]
    k = math.sqrt(host_params / seed_params)
    inf = math.inf
    return [
        math.sqrt(s / h) * k
        if s is not None and h is not None and 0.0 <= s < inf and 0.0 < h < inf
        else seed_ratio(s, seed_params, h, host_params)
        for s, h in zip(seed_sqs, host_sqs)
    ]
