"""With no daemon for a whole run, nothing is counted as sent: every capture shows up in the
collector's ``dropped`` (ZMQ_IMMEDIATE: libzmq queues only to a completed connection)."""

from __future__ import annotations

from collector_support import free_port, make_model, train_step

import esper_telemetry as et


def test_daemon_absent_for_the_whole_run_every_capture_is_dropped_and_counted():
    model = make_model()
    tel = et.attach(
        model=model,
        host="host",
        seeds={"a": "seeds.a"},
        run="absent",
        endpoint=f"tcp://127.0.0.1:{free_port()}",
        close_timeout_s=1.0,
    )
    try:
        train_step(model)
        for step in range(300):
            tel.capture(step=step)
        assert tel.flush(10.0)
        stats = tel.stats()
    finally:
        tel.close()
    assert stats["captures"] == 300 and stats["completed"] == 300
    # Hello + 300 Norms: none of them reached a daemon, so none is "sent". Before
    # ZMQ_IMMEDIATE they sat in a pipe to nobody and read sent=301, dropped=0.
    assert stats["sent"] == 0, stats
    assert stats["dropped"] == 301, stats
    assert tel._publisher.messages == 0
