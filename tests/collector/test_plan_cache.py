"""The plan cache's one eviction rule: PLANS layouts (LRU), KEYS address sets per plan, and
a slice's graphs and use counts only for address sets its plan still knows; and its fast
path, which keeps a plan bound to addresses only while the gradients there still have the
element counts and dtypes it was built for."""

from __future__ import annotations

import pytest
import torch

from esper_telemetry.collector import plancache
from esper_telemetry.collector.plancache import KEYS, PLANS, PlanCache, remember, still_fits


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
    for _ in range(KEYS + 2):
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


@pytest.fixture
def address_bound(monkeypatch):
    """Plans the cache builds are bound to addresses, as plans with CUDA slices are: CPU tensors
    stand in for CUDA ones (addresses, dtypes and sizes are all the cache reads)."""

    def build(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.cuda = [plan.cpu]
        return plan

    real = plancache.build_plan
    monkeypatch.setattr(plancache, "build_plan", build)
    signatures = []
    real_signature = plancache.grad_signature
    monkeypatch.setattr(
        plancache, "grad_signature", lambda grads: signatures.append(1) or real_signature(grads)
    )
    return signatures


def _views(store: torch.Tensor, dtype: torch.dtype, sizes) -> list[torch.Tensor]:
    """Gradients of ``sizes`` elements of ``dtype`` at fixed addresses inside ``store``: what the
    caching allocator hands out again after ``zero_grad(set_to_none=True)``."""
    flat = store.view(dtype)
    slot = 128 // flat.element_size()  # 128 bytes apart, whatever the dtype
    return [flat[slot * i : slot * i + n] for i, n in enumerate(sizes)]


def test_an_address_bound_plan_is_kept_while_its_gradients_stay_what_it_was_built_for(
    address_bound,
):
    cache, _ = _cache()
    store = torch.zeros(256, dtype=torch.float16)
    params = _params(3)
    grads = _views(store, torch.float16, [16, 16, 16])
    plan = cache.plan_for(grads, False, [tuple(params)], [False], [48])
    assert plan.cuda and plan.numels == [16, 16, 16] and plan.dtypes == [torch.float16] * 3
    for _ in range(3):  # the same gradients, or new tensors at the same addresses: fast path
        assert cache.plan_for(grads, False, [tuple(params)], [False], [48]) is plan
        grads = _views(store, torch.float16, [16, 16, 16])
    assert cache.built == 1 and len(address_bound) == 1  # the layout was read once, to build


@pytest.mark.parametrize(
    "dtype,sizes",
    [
        pytest.param(torch.bfloat16, [16, 16, 16], id="bf16-over-fp16"),  # same size, same bytes
        pytest.param(torch.float32, [8, 8, 8], id="fp32-over-fp16"),  # in-place cast, same bytes
        pytest.param(torch.float16, [16, 8, 16], id="fewer-elements"),  # a resized .data
        pytest.param(torch.float16, [16, 32, 16], id="more-elements"),
    ],
)
def test_other_gradients_at_the_same_addresses_get_their_own_plan(address_bound, dtype, sizes):
    """Addresses alone would replay kernels built for the old dtype or element count."""
    cache, _ = _cache()
    store = torch.zeros(256, dtype=torch.float16)
    groups = [tuple(_params(3))]
    before = _views(store, torch.float16, [16, 16, 16])
    first = cache.plan_for(before, False, groups, [False], [48])
    after = _views(store, dtype, sizes)
    assert plancache.grad_key(after) == first.key  # the very same addresses
    second = cache.plan_for(after, False, groups, [False], [48])
    assert second is not first and cache.built == 2
    assert second.numels == sizes and second.dtypes == [dtype] * 3
    assert second.cpu.buckets == [(dtype, 0, 3)]
    # the first layout coming back at those addresses finds its plan again, unbuilt
    assert cache.plan_for(before, False, groups, [False], [48]) is first
    assert cache.plan_for(after, False, groups, [False], [48]) is second
    assert cache.built == 2


def test_a_missing_gradient_where_the_plan_had_an_empty_one_is_another_layout(address_bound):
    """Both have address 0: the check must tell them apart, not raise."""
    cache, _ = _cache()
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(0))]
    empty = [torch.randn(4), torch.zeros(0)]
    first = cache.plan_for(empty, False, [tuple(params)], [False], [4])
    missing = [empty[0], None]
    assert plancache.grad_key(missing) == first.key
    second = cache.plan_for(missing, False, [tuple(params)], [False], [4])
    assert second is not first and second.present == (True, False) and second.numels == [4]


def test_still_fits_reads_element_counts_and_dtypes():
    cache, _ = _cache()
    params = _params(3)
    grads = [torch.randn(4), None, torch.randn(4)]
    plan = cache.plan_for(grads, False, [tuple(params)], [False], [12])
    assert plan.numels == [4, 4] and plan.dtypes == [torch.float32] * 2
    assert still_fits(plan, grads)
    assert still_fits(plan, [torch.randn(4), None, torch.randn(4)])
    assert not still_fits(plan, [torch.randn(4), None, torch.randn(3)])
    assert not still_fits(plan, [torch.randn(4), None, torch.randn(4, dtype=torch.float64)])
    assert not still_fits(plan, [torch.randn(4), torch.randn(4), torch.randn(4)])
