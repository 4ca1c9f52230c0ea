"""A daemon SIGKILLed and restarted on the same port while a collector sends: after the
restart, what the new daemon counts as lost plus what arrived at either daemon accounts
for everything the collector produced, within what libzmq held at the kill; what the
collector could not hand to any daemon meanwhile is in its own ``dropped``."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from live_daemon import LiveDaemon

from esper_telemetry import GroupNorm, Norms
from esper_telemetry.collector.publisher import Publisher

pytestmark = pytest.mark.slow

RUN = (("run", "restart"),)


def captures(s) -> float:
    return s.get(("esper_captures_total", RUN), 0.0)


def test_daemon_sigkilled_and_restarted_mid_run_lost_plus_arrived_equals_produced(tmp_path):
    d1 = LiveDaemon(tmp_path / "d1.log")
    endpoint = d1.endpoint
    pub = Publisher(endpoint, "restart", 0, queue_size=4096, heartbeat_s=3600.0, max_batch=1)
    produced = [0]
    stop = threading.Event()

    def produce() -> None:  # a training loop: one capture a millisecond, never blocked
        step = 0
        while not stop.is_set():
            norms = Norms(
                "restart",
                0,
                time.time(),
                step,
                False,
                (GroupNorm("host", "host", 10, float(step), 0, False, False),),
            )
            pub.publish(norms)
            produced[0] += 1
            step += 1
            time.sleep(0.001)

    producer = threading.Thread(target=produce)
    d2 = None
    try:
        producer.start()
        s = d1.scrape_until(lambda s: captures(s) >= 300, "300 captures at the first daemon")
        a1 = captures(s)
        d1.proc.send_signal(signal.SIGKILL)
        d1.proc.wait(10)
        time.sleep(0.5)  # the job goes on without a daemon
        # What libzmq took before it saw the first daemon gone (IMMEDIATE: none after).
        sent_at_kill = pub.messages
        dropped_while_down = pub.dropped
        d2 = LiveDaemon(tmp_path / "d2.log", f"--zmq.listen-address={endpoint}")
        d2.scrape_until(lambda s: captures(s) >= 300, "300 captures at the restarted daemon")
        stop.set()
        producer.join(10)
        assert pub.drain(10.0)
        s, seen = d2.scrape(), -1.0
        deadline = time.monotonic() + 10
        while captures(s) != seen and time.monotonic() < deadline:  # until it settles
            seen = captures(s)
            time.sleep(0.3)
            s = d2.scrape()
        messages, sent, dropped = pub.messages, pub.sent, pub.dropped  # before close's heartbeat
    finally:
        stop.set()
        producer.join(10)
        pub.close(None, 2.0)
        d1.stop()
        if d2 is not None:
            d2.stop()
    a2 = captures(s)
    lost = s[("esper_messages_lost_total", (("rank", "0"), ("run", "restart")))]
    # One event per message (max_batch=1), no heartbeats: messages are captures here.
    held_at_kill = messages - (a1 + a2 + lost)
    # libzmq held at most what was handed to it but not yet seen at the first daemon.
    assert 0 <= held_at_kill <= sent_at_kill - a1, (messages, a1, a2, lost, sent_at_kill)
    # Nothing counted as sent went to nobody: with no daemon the captures were dropped.
    assert dropped_while_down > 0
    assert sent + dropped == produced[0]
