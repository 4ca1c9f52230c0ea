"""The seed/host ratio, shared by the collector (in process) and the daemon (at scrape)."""

from __future__ import annotations

import math
import random

import pytest

from esper_telemetry.ratio import seed_ratio, seed_ratios

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    "seed_sq, host_sq, want",
    [
        (9.0, 16.0, 1.5),  # (3 / 4) * sqrt(400 / 100)
        (None, 16.0, 0.0),  # a seed without gradient has norm 0
        (9.0, None, 0.0),  # undefined: the host has no gradient
        (9.0, 0.0, 0.0),  # ... or a zero norm
        (INF, 16.0, INF),  # an exploding seed is never starved
        (INF, None, INF),
        (INF, 0.0, INF),
        (NAN, 16.0, NAN),
        (NAN, None, NAN),
        (9.0, NAN, NAN),  # a NaN host: no number
        (None, NAN, NAN),
        (INF, NAN, NAN),
        (INF, INF, NAN),  # Inf over Inf is undefined
        (9.0, INF, 0.0),  # a finite seed over an exploding host, as computed
    ],
)
def test_seed_ratio(seed_sq, host_sq, want):
    got = seed_ratio(seed_sq, 100, host_sq, 400)
    if want != want:
        assert got != got, got
    else:
        assert got == want


@pytest.mark.parametrize("seed_params, host_params", [(0, 400), (100, 0), (None, 400), (100, None)])
def test_unknown_parameter_counts_give_zero_unless_the_seed_is_non_finite(seed_params, host_params):
    assert seed_ratio(9.0, seed_params, 16.0, host_params) == 0.0
    assert seed_ratio(INF, seed_params, 16.0, host_params) == INF
    assert math.isnan(seed_ratio(NAN, seed_params, 16.0, host_params))


@pytest.mark.parametrize("seed_params, host_params", [(100, 400), (7, 3), (0, 400), (None, 400)])
def test_seed_ratios_is_seed_ratio_at_every_step_bit_for_bit(seed_params, host_params):
    rng = random.Random(5)
    special = [None, 0.0, INF, NAN, 5e-324, 1e308]
    seeds = [rng.lognormvariate(0, 3) for _ in range(200)] + special * len(special)
    hosts = [rng.lognormvariate(0, 3) for _ in range(200)] + [h for h in special for _ in special]
    got = seed_ratios(seeds, seed_params, hosts, host_params)
    want = [seed_ratio(s, seed_params, h, host_params) for s, h in zip(seeds, hosts)]
    assert len(got) == len(want) == 236
    for g, w, s, h in zip(got, want, seeds, hosts):
        assert (g == w) or (g != g and w != w), (s, h, g, w)
