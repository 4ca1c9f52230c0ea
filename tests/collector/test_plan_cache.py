"""The plan cache's one eviction rule: PLANS layouts (LRU), KEYS address sets per plan, and
a slice's graphs and use counts only for address sets its plan still knows."""

from __future__ import annotations

import torch

from esper_telemetry.collector.plancache import KEYS, PLANS, PlanCache, remember


def _cache():
    layouts = []
    return PlanCache(lambda old, new: layouts.append((old, new)), pointer_tables=False), layouts


def _params(n=3):
    return [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]


def test_a_cpu_plan_is_kept_by_which_gradients_exist_not_by_their_addresses():
    cache, layouts = _cache()
    params = _params()
    groups = [tuple(params)]
    plans, alive = [], []
    for i in range(KEYS + 2):
        grads = [torch.randn(4) for _ in params]  # new tensors: new addresses, same layout
        alive.append(grads)  # so no address comes back
        plans.append(cache.plan_for(grads, False, groups, [False], [12]))
    assert len({tuple(g.data_ptr() for g in grads) for grads in alive}) == KEYS + 2
    # one plan, built once, never re-keyed: no address set recorded past the first
    assert cache.built == 1 and all(p is plans[0] for p in plans)
    assert len(plans[0].known_keys) == 1 and plans[0].present == (True, True, True)
    assert len(layouts) == 1 and layouts[0][0] is None  # one new layout, reported once
    # a gradient gone is another layout (a new plan), and its return finds the first again
    fewer = cache.plan_for([alive[0][0], None, alive[0][2]], False, groups, [False], [12])
    assert fewer is not plans[0] and fewer.present == (True, False, True) and cache.built == 2
    assert fewer.cpu.positions == [0, 2] and not fewer.cpu.identity and plans[0].cpu.identity
    assert (
        cache.plan_for([torch.randn(4) for _ in params], False, groups, [False], [12]) is plans[0]
    )
    assert cache.built == 2
    # refit (the pass found a dtype changed in place) looks the layout up again
    double = [torch.randn(4, dtype=torch.float64) for _ in params]
    refit = cache.plan_for(double, False, groups, [False], [12], refit=True)
    assert (
        refit is not plans[0] and refit.cpu.buckets == [(torch.float64, 0, 3)] and cache.built == 3
    )


def test_address_sets_per_plan_forget_the_oldest_with_their_graphs():
    cache, _ = _cache()
    params = _params()
    plan = cache.plan_for([torch.randn(4) for _ in params], False, [tuple(params)], [False], [12])
    keys = [(i, i + 1, i + 2) for i in range(KEYS + 2)]  # address sets as a CUDA plan sees them
    for i, key in enumerate(keys):
        remember(plan, key)
        for s in plan.slices:  # what the passes would leave for this address set
            s.seen[key] = 1
            s.graphs[key] = ("graph", i)
    assert list(plan.known_keys) == keys[-KEYS:] and plan.key == keys[-1]
    for s in plan.slices:
        assert set(s.graphs) == set(s.seen) == set(keys[-KEYS:])


def test_layouts_beyond_plans_drop_the_least_recently_used():
    cache, layouts = _cache()
    params = _params(PLANS + 2)
    groups = [tuple(params)]
    built = []
    for present in range(1, PLANS + 3):  # a different set of gradients present each time
        grads = [torch.randn(4) if i < present else None for i in range(len(params))]
        built.append(cache.plan_for(grads, False, groups, [False], [4 * len(params)]))
    assert cache.built == PLANS + 2 and len(cache._plans) == PLANS
    again = [torch.randn(4) if i < 1 else None for i in range(len(params))]
    plan = cache.plan_for(again, False, groups, [False], [4 * len(params)])
    assert plan is not built[0] and cache.built == PLANS + 3  # the first layout was forgotten
    recent = [torch.randn(4) if i < PLANS + 2 else None for i in range(len(params))]
    assert cache.plan_for(recent, False, groups, [False], [4 * len(params)]) is built[-1]


def test_rebound_parameters_drop_every_plan():
    cache, _ = _cache()
    params = _params()
    grads = [torch.randn(4) for _ in params]
    first = cache.plan_for(grads, False, [tuple(params)], [False], [12])
    second = cache.plan_for(grads, True, [tuple(params)], [False], [12])
    assert second is not first and cache.built == 2 and list(cache._plans.values()) == [second]
