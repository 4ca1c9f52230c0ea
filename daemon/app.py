"""The one wiring point, and the daemon's lifecycle: start, serve, shut down once.

``Daemon`` builds receiver -> queue -> pump -> aggregator -> exporter, handing each its
dependencies; the ``Pump`` is the wiring between the queue and the aggregator's state
machine, with the clock that tells the aggregator the time. ``serve`` runs it like
uvicorn's ``Server``: start (any bind failure is one clear error), run until a stop is
requested, then shut down with a deadline, exactly once.
``Signals`` turns the first SIGTERM/SIGINT into a graceful stop and a second into an
immediate exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from .aggregator import Aggregator, Limits
from .config import Config
from .curve import DENY_REASONS, CurveGate, read_server_keys
from .exporter import Exposition, process_registry
from .memory import MemoryGuard
from .page import Pages
from .pump import Pump
from .queue import EventQueue
from .receiver import Receiver
from .snapshot import Snapshot
from .stats import DaemonStats
from .steps import StepRules
from .web import WebServer
from .webconfig import WebConfigError, load_web_config

__all__ = ["Daemon", "Pump", "StartupError", "Signals", "serve", "limits"]

_log = logging.getLogger("esper_telemetry.daemon")

# Decoding allocates a few container objects per event and almost never makes a cycle, so
# CPython's default gen-0 threshold (700) runs a collection every ~100 events, scanning
# young objects that are about to be freed by reference counting anyway. A higher threshold,
# with startup's objects frozen out of the scans, measured +25-35% ingest throughput.
_GC_THRESHOLDS = (20_000, 50, 100)


class StartupError(RuntimeError):
    """The daemon could not start (an address in use or invalid); the message is one line."""


def limits(config: Config) -> Limits:
    """The aggregator's caps and windows, from the configuration."""
    return Limits(
        max_runs=config.max_runs,
        max_groups_per_run=config.max_groups_per_run,
        max_ranks_per_run=config.max_ranks_per_run,
        ttl_s=config.run_ttl_s,
        shard_window_s=config.shard_window_s,
        ended_retention_s=config.run_ended_retention_s,
        evict_after_s=config.run_evict_after_s,
    )


class Daemon:
    """The pipeline, wired; ``start`` binds, ``shutdown`` drains and releases."""

    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = _log,
        process_metrics: bool = True,
    ) -> None:
        self.config = config
        self._log = logger
        self.stats = DaemonStats()
        self.queue = EventQueue(config.queue_size)
        self.aggregator = Aggregator(
            limits(config),
            self.stats,
            logger.getChild("aggregator"),
            StepRules(window_s=config.window_s, spike_factor=config.spike_factor),
        )
        self.pump = Pump(
            self.queue, self.aggregator, self.stats, clock, logger.getChild("aggregator")
        )
        self._context = zmq.asyncio.Context()
        # CURVE on the ingest sockets when the daemon has a key (read again here: the file
        # may have changed since the configuration was checked).
        self.curve: CurveGate | None = None
        if config.zmq_curve_secret_key_file:
            try:
                keys = read_server_keys(config.zmq_curve_secret_key_file)
            except ValueError as exc:
                self._context.term()
                raise StartupError(f"--zmq.curve.secret-key-file: {exc}") from None
            self.curve = CurveGate(
                self._context,
                keys,
                config.zmq_curve_authorized_keys_dir or None,
                logger.getChild("curve"),
            )
        self.receiver = Receiver(
            self._context,
            config.zmq_listen_addresses,
            self.queue,
            self.stats,
            logger.getChild("receiver"),
            max_message_bytes=config.zmq_max_message_bytes,
            receive_buffer_bytes=config.zmq_receive_buffer_bytes,
            secure=None if self.curve is None else self.curve.secure,
        )
        process = process_registry() if process_metrics else None
        web_config = None
        if config.web_config_file:
            try:
                web_config = load_web_config(config.web_config_file)
            except WebConfigError as exc:
                self._close_curve()
                self._context.term()
                raise StartupError(f"--web.config.file: {exc}") from None
        self.web_config = web_config
        # The scrape's series cap and fast rendering (exporter.Exposition), off the loop.
        self.exposition = Exposition(config.web_max_series, process, logger.getChild("web"))
        self.web = WebServer(
            config.web_listen_address.host,
            config.web_listen_address.port,
            config.telemetry_path,
            self.snapshot,
            self.exposition.render,
            self.ready,
            logger.getChild("web"),
            write_timeout_s=config.web_write_timeout_s,
            max_connections=config.web_max_connections,
            ssl_context=None if web_config is None else web_config.ssl_context,
            auth=None if web_config is None else web_config.auth,
            # The live page and its JSON API (page.py), from the aggregator and the snapshot.
            pages=(pages := Pages(self.aggregator.history, self.snapshot, config.telemetry_path)),
        )
        self.pages = pages
        self.web_address = ""
        self._tasks: list[asyncio.Task] = []
        self._receiving: asyncio.Task | None = None
        self._ready = False
        self._stopped = False

    @property
    def tasks(self) -> list[asyncio.Task]:
        """The running stages (receiver, aggregator, ticker)."""
        return list(self._tasks)

    # --- readiness and the snapshot ------------------------------------------------------

    def ready(self) -> bool:
        """True between a successful start and the beginning of shutdown."""
        return self._ready

    def snapshot(self) -> Snapshot:
        """What a scrape shows now: the aggregator's state and the queue's figures.

        Call on the loop thread (the web server does, before it renders off the loop).
        """
        return self.aggregator.snapshot()._replace(
            queue_length=len(self.queue),
            queue_capacity=self.queue.capacity,
            auth_denied=dict(self.curve.denied)
            if self.curve is not None
            else dict.fromkeys(DENY_REASONS, 0),
            http_refused={
                "max_connections": self.web.refused,
                "write_timeout": self.web.write_timeouts,
                "unauthorized": self.web.unauthorized,
                "busy": self.web.busy,
                "header_timeout": self.web.header_timeouts,
                "preempted": self.web.preempted,
                "bad_request": self.web.bad_requests,
                "page_busy": self.pages.busy,
                "page_write_timeout": self.pages.write_timeouts,
            },
            memory_sheds=dict(self.stats.memory_sheds),
        )

    def reload(self) -> None:
        """SIGHUP: read the authorized collector keys again (the one thing that reloads)."""
        if self.curve is not None and self.config.zmq_curve_authorized_keys_dir:
            self.curve.reload("SIGHUP")
        else:
            self._log.info("SIGHUP: nothing to reload (no --zmq.curve.authorized-keys-dir)")

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every socket and the HTTP port, then start the stages; ``StartupError`` if not."""
        if self.curve is not None:
            self.curve.start()  # the ZAP handler exists before any socket can handshake
        try:
            endpoints = self.receiver.bind()
        except zmq.ZMQError as exc:
            self._close_curve()
            self._context.term()
            raise StartupError(str(exc)) from None
        try:
            host, port = await self.web.start()
        except (OSError, ValueError) as exc:  # ValueError: a host IDNA cannot encode
            self.receiver.close()
            self._close_curve()
            self._context.term()
            raise StartupError(
                f"cannot listen on {self.config.web_listen_address}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        self.web_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._receiving = asyncio.create_task(self.receiver.run(), name="receiver")
        cfg = self.config
        tick_s = max(0.05, min(1.0, cfg.run_ttl_s / 4, cfg.shard_window_s / 4))
        self._tasks = [
            self._receiving,
            asyncio.create_task(self.pump.run(), name="aggregator"),
            asyncio.create_task(self.pump.tick_every(tick_s), name="ticker"),
            asyncio.create_task(self._guard(endpoints).run(), name="memory guard"),
        ]
        self._ready = True
        self._log.info(
            "listening zmq=%s web=%s path=%s",
            ",".join(endpoints),
            self.web_address,
            self.config.telemetry_path,
        )
        if self.curve is None:
            # Said once: anyone who reaches these endpoints can send events.
            self._log.warning(
                "ingest is unauthenticated: any peer that reaches %s can create "
                "runs and send events (--zmq.curve.secret-key-file turns CURVE on)",
                ",".join(endpoints),
            )
        else:
            who = (
                f"{self.curve.authorized} authorized keys from "
                f"{self.config.zmq_curve_authorized_keys_dir}"
                if self.config.zmq_curve_authorized_keys_dir
                else "any CURVE client"
            )
            self._log.info("ingest requires CURVE: %s", who)
        self._log.info(
            "web: %s",
            "plain HTTP, no authentication"
            if self.web_config is None
            else self.web_config.describe(),
        )

    def _guard(self, endpoints: list[str]) -> MemoryGuard:
        """What libzmq buffers for the TCP collectors, bounded by --limits.memory-bytes."""
        ports = [int(e.rsplit(":", 1)[1]) for e in endpoints if e.startswith("tcp://")]
        return MemoryGuard(
            self.config.memory_limit_bytes,
            ports,
            self.stats.memory_sheds,
            self._log.getChild("memory"),
        )

    async def shutdown(self) -> None:
        """Stop receiving, drain the queue by the deadline, linger for a last scrape, close.

        Runs once; later calls return at once.
        """
        if self._stopped:
            return
        self._stopped = True
        self._ready = False
        cfg = self.config
        deadline = time.monotonic() + cfg.shutdown_timeout_s
        if self._receiving is not None:
            self._receiving.cancel()
            await asyncio.gather(self._receiving, return_exceptions=True)
        # What the sockets hold, then what is queued, by the deadline; the rest is counted
        # as rejected{reason="shutdown"}.
        left_buffered = await self.receiver.drain(self.pump.drain, deadline)
        while len(self.queue) and time.monotonic() < deadline:
            self.pump.drain(4096)
            await asyncio.sleep(0)
        left_events = len(self.queue)
        left_queued = self.queue.clear()
        self.stats.rejected["shutdown"] += left_queued
        if left_buffered or left_queued:
            self._log.warning(
                "shutdown deadline passed: %d messages still buffered and %d "
                "(%d events) still queued were dropped and counted",
                left_buffered,
                left_queued,
                left_events,
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if cfg.shutdown_linger_s > 0:
            self.web.scraped.clear()
            try:
                await asyncio.wait_for(self.web.scraped.wait(), cfg.shutdown_linger_s)
            except asyncio.TimeoutError:
                pass
        await self.web.close()
        self._close_curve()
        self._context.term()

    def _close_curve(self) -> None:
        if self.curve is not None:
            self.curve.close()


class Signals:
    """First SIGTERM/SIGINT: ``stop.set()``; a second one: ``force_exit(128 + signum)``."""

    def __init__(
        self,
        stop: asyncio.Event,
        force_exit: Callable[[int], None] = os._exit,
        logger: logging.Logger = _log,
    ) -> None:
        self._stop = stop
        self._force_exit = force_exit
        self._log = logger

    def __call__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            self._log.warning("second %s: exiting now", name)
            logging.shutdown()
            self._force_exit(128 + signum)
            return
        self._log.info("%s received: draining and shutting down", name)
        self._stop.set()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self, int(sig))


async def serve(config: Config, logger: logging.Logger = _log) -> int:
    """Run the daemon until SIGTERM/SIGINT; the process exit status."""
    try:
        daemon = Daemon(config, logger=logger)
    except StartupError as exc:
        logger.error("%s", exc)
        return 1
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    # Handlers first: a signal that arrives while starting still means a graceful stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    Signals(stop, logger=logger).install(loop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    try:
        await daemon.start()
    except StartupError as exc:
        logger.error("%s", exc)
        return 1
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopping, *daemon.tasks], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if stopping not in done:  # a stage ended on its own: a bug, never bad input
        stopping.cancel()
        for task in done:
            logger.error(
                "stage %s stopped unexpectedly: %r",
                task.get_name(),
                task.exception() if not task.cancelled() else "cancelled",
            )
        status = 1
    await daemon.shutdown()
    s = daemon.stats
    logger.info(
        "stopped: messages=%d events=%d rejected=%d", s.messages, s.events, sum(s.rejected.values())
    )
    return status
