"""Non-finite gradients on /metrics: an exploding group reads as exploding, never as starved.

A group whose gradient holds an Inf or a NaN arrives with ``sq`` +Inf or NaN (and a
non-finite count). It has gradient, its norm is +Inf or NaN, and a seed's ratio is +Inf or
NaN, never 0: the expositions are parsed, and their literal values read, in both formats
the daemon writes (text and OpenMetrics).
"""

from __future__ import annotations

import math

import pytest
import zmq
from daemon_process import scrape_until, spawn, started
from daemon_support import exposition, get, gn, hello, http_get, norms, parse, wait_for
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om

from esper_telemetry import decode, encode
from esper_telemetry.daemon.textformat import OPENMETRICS, TEXT

DECLS = (("host", "host", 400, False), ("seed", "seed", 100, True), ("frozen", "group", 50, True))


def exploding(run="r", step=1, host_sq=16.0, seed_sq=math.inf, frozen_sq=math.nan):
    """Norms with a seed holding an Inf and another group holding a NaN, as the wire sends
    them (a non-finite sum comes with a non-finite count)."""

    def nf(sq):
        return 0 if sq is None or math.isfinite(sq) else 1

    return norms(
        run,
        0,
        step,
        (
            gn("host", host_sq, "host", 400, nonfinite=nf(host_sq)),
            gn("seed", seed_sq, "seed", 100, nonfinite=nf(seed_sq), isolated=True),
            gn("frozen", frozen_sq, "group", 50, nonfinite=nf(frozen_sq), isolated=True),
        ),
    )


def test_inf_seed_and_nan_group_have_gradient_a_non_finite_norm_and_ratio(make_agg, clock):
    agg, _ = make_agg()
    # Through the codec, as the daemon receives them: the wire carries +Inf and NaN.
    agg.apply_batch(decode(encode([hello(decls=DECLS), exploding()])), clock())
    s = parse(exposition(agg))
    for group in ("host", "seed", "frozen"):
        assert get(s, "esper_group_has_gradient", run="r", group=group) == 1, group
    assert get(s, "esper_grad_norm", run="r", group="host") == 4.0
    assert get(s, "esper_grad_norm", run="r", group="seed") == math.inf
    assert math.isnan(get(s, "esper_grad_norm", run="r", group="frozen"))
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") == math.inf
    assert get(s, "esper_grad_nonfinite_total", run="r", group="seed") == 1
    assert get(s, "esper_grad_nonfinite_total", run="r", group="frozen") == 1
    assert get(s, "esper_grad_nonfinite_total", run="r", group="host") == 0


@pytest.mark.parametrize(
    "host_sq, seed_sq, want",
    [
        (16.0, math.nan, "nan"),  # a NaN seed: NaN
        (math.nan, 4.0, "nan"),  # a NaN host: NaN
        (math.inf, 4.0, 0.0),  # a finite seed over an exploding host: 0, as computed
        (math.inf, math.inf, "nan"),  # Inf over Inf: undefined
        (None, math.inf, math.inf),  # an exploding seed over a host without gradient
        (0.0, math.inf, math.inf),  # ... or a zero host
    ],
)
def test_seed_ratio_of_non_finite_sums(make_agg, clock, host_sq, seed_sq, want):
    agg, _ = make_agg()
    agg.apply_batch(
        decode(encode(exploding(host_sq=host_sq, seed_sq=seed_sq, frozen_sq=1.0))), clock()
    )
    ratio = get(
        parse(exposition(agg)),
        "esper_seed_grad_ratio",
        run="r",
        seed="seed",
    )
    if want == "nan":
        assert math.isnan(ratio)
    else:
        assert ratio == want


def test_a_sharded_step_with_an_inf_shard_is_inf(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch([hello(world_size=2, decls=DECLS)], clock())
    agg.apply_batch(
        [
            norms(
                rank=0,
                step=3,
                groups=[
                    gn("seed", 4.0, "seed", 100, sharded=True),
                    gn("host", 1.0, "host", 400, sharded=True),
                ],
            )
        ],
        clock(),
    )
    agg.apply_batch(
        [
            norms(
                rank=1,
                step=3,
                groups=[
                    gn("seed", math.inf, "seed", 100, nonfinite=1, sharded=True),
                    gn("host", math.nan, "host", 400, nonfinite=1, sharded=True),
                ],
            )
        ],
        clock(),
    )
    s = parse(exposition(agg))
    assert get(s, "esper_grad_norm", run="r", group="seed") == math.inf
    assert math.isnan(get(s, "esper_grad_norm", run="r", group="host"))
    assert get(s, "esper_group_has_gradient", run="r", group="seed") == 1
    assert math.isnan(get(s, "esper_seed_grad_ratio", run="r", seed="seed"))


def _literal(text: str, name: str, **labels: str) -> str:
    """The value of one sample as written in the exposition, whatever the label order."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"no {name}{labels} in:\n{text}")


@pytest.mark.parametrize("fmt", [TEXT, OPENMETRICS])
def test_both_formats_write_plus_inf_and_nan(make_agg, clock, fmt):
    agg, _ = make_agg()
    agg.apply_batch([hello(decls=DECLS), exploding()], clock())
    text = exposition(agg, fmt=fmt)
    assert _literal(text, "esper_grad_norm", run="r", group="seed") == "+Inf"
    assert _literal(text, "esper_grad_norm", run="r", group="frozen") == "NaN"
    assert _literal(text, "esper_seed_grad_ratio", run="r", seed="seed") == "+Inf"
    assert _literal(text, "esper_group_has_gradient", run="r", group="seed") in ("1", "1.0")
    if fmt == OPENMETRICS:
        # promtool 2.42 cannot lint OpenMetrics (it has no "info" type): the strict
        # OpenMetrics parser of prometheus_client reads it instead, values included.
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parse_om(text)
            for s in f.samples
        }
        assert samples[("esper_grad_norm", (("group", "seed"), ("run", "r")))] == math.inf
        assert math.isnan(samples[("esper_grad_norm", (("group", "frozen"), ("run", "r")))])


async def test_through_the_wired_daemon_over_zeromq_and_http(start_daemon, push):
    d = await start_daemon(process_metrics=False)
    sock = push(d.endpoint)
    sock.send(encode([hello(decls=DECLS), exploding(step=1)]))
    await wait_for(lambda: d.daemon.stats.events == 2, 10, "two events")
    s = await d.scrape()
    assert get(s, "esper_daemon_rejected_total", reason="value") == 0
    assert get(s, "esper_grad_norm", run="r", group="seed") == math.inf
    assert math.isnan(get(s, "esper_grad_norm", run="r", group="frozen"))
    assert get(s, "esper_group_has_gradient", run="r", group="seed") == 1
    assert get(s, "esper_seed_grad_ratio", run="r", seed="seed") == math.inf


@pytest.mark.slow
def test_console_script_exports_plus_inf_for_an_exploding_seed():
    proc = spawn("--zmq.listen-address=tcp://127.0.0.1:*", "--web.listen-address=127.0.0.1:0")
    try:
        (endpoint,), web = started(proc)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(endpoint)
        sock.send(encode(hello(run="boom", decls=DECLS)))
        sock.send(encode([exploding(run="boom", step=s) for s in range(1, 4)]))
        s = scrape_until(
            f"http://{web}/metrics", lambda s: get(s, "esper_daemon_events_total") == 4
        )
        sock.close()
        ctx.term()
        assert get(s, "esper_daemon_events_total") == 4
        assert get(s, "esper_grad_norm", run="boom", group="seed") == math.inf
        assert math.isnan(get(s, "esper_grad_norm", run="boom", group="frozen"))
        assert get(s, "esper_group_has_gradient", run="boom", group="seed") == 1
        assert get(s, "esper_seed_grad_ratio", run="boom", seed="seed") == math.inf
        assert get(s, "esper_grad_nonfinite_total", run="boom", group="seed") == 3
        status, body, _ = http_get(f"http://{web}/metrics")  # what Prometheus reads
        assert status == 200
        assert _literal(body, "esper_grad_norm", run="boom", group="seed") == "+Inf"
        assert _literal(body, "esper_seed_grad_ratio", run="boom", seed="seed") == "+Inf"
        assert _literal(body, "esper_grad_norm", run="boom", group="frozen") == "NaN"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except Exception:
                proc.kill()
                proc.wait(5)
