"""A collector with CURVE keys against a real daemon process that requires them."""

from __future__ import annotations

import math
import shutil

import torch
import torch.nn as nn
from daemon_process import scrape_until, spawn, started

import esper_telemetry as et
from esper_telemetry.certificates import write_key_pair


def curve_daemon(tmp_path, other: str):
    """Keys for the daemon, rank0 (authorized) and ``other`` (not), and a daemon process
    requiring CURVE; returns (keys folder, authorized folder, process)."""
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    keys.mkdir()
    authorized.mkdir()
    for name in ("daemon", "rank0", other):
        write_key_pair(keys, name)
    shutil.copy(keys / "rank0.key", authorized / "rank0.key")
    proc = spawn(
        "--zmq.listen-address=tcp://127.0.0.1:*",
        "--web.listen-address=127.0.0.1:0",
        f"--zmq.curve.secret-key-file={keys / 'daemon.key_secret'}",
        f"--zmq.curve.authorized-keys-dir={authorized}",
    )
    return keys, authorized, proc


def test_only_the_authorized_collector_is_exported_and_the_refused_one_counts_its_drops(
    tmp_path,
) -> None:
    keys, _, proc = curve_daemon(tmp_path, "intruder")
    try:
        (endpoint,), web = started(proc)
        metrics = f"http://{web}/metrics"
        model = nn.Linear(4, 2)
        model.weight.grad = torch.full_like(model.weight, 0.5)  # sq = 8 * 0.25 = 2
        model.bias.grad = None
        stats = {}
        for run, name in (("trusted", "rank0"), ("intruder", "intruder"), ("plain", None)):
            kwargs = (
                {}
                if name is None
                else dict(
                    server_public_key_file=str(keys / "daemon.key"),
                    client_secret_key_file=str(keys / f"{name}.key_secret"),
                )
            )
            with et.attach(groups={"g": model}, run=run, endpoint=endpoint, **kwargs) as tel:
                for _ in range(5):
                    tel.capture()
                tel.flush(5.0)
                stats[run] = tel.stats()
        samples = scrape_until(
            metrics, lambda s: s.get(("esper_captures_total", (("run", "trusted"),))) == 5.0, 20
        )
        norm = samples[("esper_grad_norm", (("group", "g"), ("run", "trusted")))]
        assert math.isclose(norm, 2.0**0.5, rel_tol=1e-6)  # fp32 norms, float64 reference
        # Nothing of the refused collectors reached the aggregator ...
        assert not any(dict(labels).get("run") in ("intruder", "plain") for _, labels in samples)
        denied = {
            dict(labels)["reason"]: v
            for (name, labels), v in samples.items()
            if name == "esper_daemon_auth_denied_total"
        }
        assert denied["unknown_key"] >= 1 and denied["no_curve"] + denied["handshake"] >= 1
        # ... and their own counters say so: every event dropped, none sent, training unharmed.
        assert stats["trusted"]["dropped"] == 0 and stats["trusted"]["sent"] > 0
        for run in ("intruder", "plain"):
            assert stats[run]["sent"] == 0 and stats[run]["dropped"] > 0, stats[run]
    finally:
        proc.terminate()
        proc.wait(20)


def test_sighup_reloads_the_authorized_keys_of_a_running_daemon(tmp_path) -> None:
    import signal

    keys, authorized, proc = curve_daemon(tmp_path, "rank1")
    try:
        started(proc)
        assert "ingest requires CURVE: 1 authorized keys" in proc.stderr.readline()
        shutil.copy(keys / "rank1.key", authorized / "rank1.key")
        proc.send_signal(signal.SIGHUP)
        # The SIGHUP reload, or the directory poll's (both reload): the first such line.
        line = next(
            line for line in iter(proc.stderr.readline, "") if "authorized CURVE keys" in line
        )
        assert ": 2 from" in line, line
        assert proc.poll() is None  # SIGHUP does not stop the daemon (its default would)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
