"""The plan cache's one eviction rule: PLANS layouts (LRU), KEYS address sets per plan, and
a slice's graphs and use counts only for address sets its plan still knows."""

from __future__ import annotations

import torch

from esper_telemetry.collector.plancache import KEYS, PLANS, PlanCache


def _cache():
    layouts = []
    return PlanCache(lambda old, new: layouts.append((old, new)), pointer_tables=False), layouts


def _params(n=3):
    return [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]


def test_new_addresses_of_one_layout_reuse_the_plan_and_forget_the_oldest():
    cache, layouts = _cache()
    params = _params()
    groups = [tuple(params)]
    plans, keys, alive = [], [], []
    for i in range(KEYS + 2):
        grads = [torch.randn(4) for _ in params]   # new tensors: new addresses, same layout
        alive.append(grads)                        # so no address comes back
        plan = cache.plan_for(grads, False, groups, [False], [12])
        plans.append(plan)
        keys.append(plan.key)
        for s in plan.slices:              # what the passes would leave for this address set
            s.seen[plan.key] = 1
            s.graphs[plan.key] = ("graph", i)
    # a plan built for one address set is found again by its layout: no rebuild
    assert cache.built == 1 and all(p is plans[0] for p in plans) and len(set(keys)) == KEYS + 2
    plan = plans[0]
    assert list(plan.known_keys) == keys[-KEYS:]
    for s in plan.slices:
        assert set(s.graphs) == set(s.seen) == set(keys[-KEYS:])
    assert len(layouts) == 1 and layouts[0][0] is None   # one new layout, reported once


def test_layouts_beyond_plans_drop_the_least_recently_used():
    cache, layouts = _cache()
    params = _params(PLANS + 2)
    groups = [tuple(params)]
    built = []
    for present in range(1, PLANS + 3):      # a different set of gradients present each time
        grads = [torch.randn(4) if i < present else None for i in range(len(params))]
        built.append(cache.plan_for(grads, False, groups, [False], [4 * len(params)]))
    assert cache.built == PLANS + 2 and len(cache._plans) == PLANS
    again = [torch.randn(4) if i < 1 else None for i in range(len(params))]
    plan = cache.plan_for(again, False, groups, [False], [4 * len(params)])
    assert plan is not built[0] and cache.built == PLANS + 3   # the first layout was forgotten
    recent = [torch.randn(4) if i < PLANS + 2 else None for i in range(len(params))]
    assert cache.plan_for(recent, False, groups, [False], [4 * len(params)]) is built[-1]


def test_rebound_parameters_drop_every_plan():
    cache, _ = _cache()
    params = _params()
    grads = [torch.randn(4) for _ in params]
    first = cache.plan_for(grads, False, [tuple(params)], [False], [12])
    second = cache.plan_for(grads, True, [tuple(params)], [False], [12])
    assert second is not first and cache.built == 2 and list(cache._plans.values()) == [second]
