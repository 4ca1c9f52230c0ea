"""CURVE on the ingest sockets: only collectors holding an authorized key get in.

- The daemon's certificate (``--zmq.curve.secret-key-file``, a ``.key_secret`` file) makes
  every PULL socket a CURVE server: a peer without CURVE, or one that does not know the
  daemon's public key, fails the handshake, and nothing it sends reaches a socket.
- With ``--zmq.curve.authorized-keys-dir`` the ZAP handler (pyzmq's asyncio authenticator)
  admits only clients whose public key is in a certificate file (``*.key``) of the
  directory; without it, any CURVE client that knows the daemon's key is admitted. The
  directory is read again on SIGHUP and when its contents change (polled), without a
  restart; a directory that cannot be read keeps the previous keys and says so.
- Refusals are counted from each socket's monitor events, by reason, whatever refused
  them: ``no_curve`` (the peer speaks another mechanism: plain ZeroMQ; when its side hangs
  up before libzmq names the mismatch, it counts as ``handshake``), ``unknown_key`` (ZAP
  refused the client's key), ``handshake`` (any other failed handshake: a wrong daemon
  key, a broken or hostile peer). Every failed attempt counts. libzmq gives up on a
  connection refused for its key or mechanism, but keeps retrying one with a wrong daemon
  key (every reconnect interval), so that reason grows for as long as such a peer runs.
"""

from __future__ import annotations

import asyncio
import logging
import os

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from esper_telemetry.certificates import KeyPair, read_certificate, read_public_keys

from .stats import DENY_REASONS

__all__ = ["CurveGate", "DENY_REASONS", "read_server_keys", "read_public_keys"]


# One ZAP domain for the daemon's sockets; the authenticator's rules apply to every domain.
_DOMAIN = b"esper-telemetry"
_MONITORED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def read_server_keys(path: str) -> KeyPair:
    """The daemon's key pair from a ``.key_secret`` certificate; ValueError says what is wrong."""
    return read_certificate(path, name=repr(path), secret=True)


def _fingerprint(directory: str) -> tuple[tuple[str, int, int], ...]:
    """What changes when a key file is added, removed or rewritten."""
    try:
        entries = os.scandir(directory)
    except OSError:
        return ()
    with entries:
        return tuple(
            sorted(
                (e.name, e.stat().st_mtime_ns, e.stat().st_size)
                for e in entries
                if e.name.endswith(".key")
            )
        )


class CurveGate:
    """Makes PULL sockets CURVE servers, runs the ZAP handler, counts refusals by reason."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        keys: KeyPair,
        authorized_keys_dir: str | None,
        logger: logging.Logger,
        poll_interval_s: float = 2.0,
    ) -> None:
        self._context = context
        self._keys = keys
        self._dir = authorized_keys_dir
        self._log = logger
        self._poll_s = poll_interval_s
        self.denied: dict[str, int] = dict.fromkeys(DENY_REASONS, 0)
        self.authorized = 0  # keys admitted now (0 with no directory: any CURVE client)
        self._auth: AsyncioAuthenticator | None = None
        self._monitors: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task] = []
        self._seen: tuple[tuple[str, int, int], ...] = ()

    def start(self) -> None:
        """Start the ZAP handler on the context (before any socket binds); loads the keys."""
        auth = AsyncioAuthenticator(self._context, log=self._log.getChild("zap"))
        auth.start()
        self._auth = auth
        if self._dir is None:
            auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            self.reload("start")
        if self._dir is not None:
            self._tasks.append(asyncio.ensure_future(self._watch_dir()))

    def secure(self, sock: zmq.asyncio.Socket) -> None:
        """Make ``sock`` a CURVE server behind the ZAP handler; watch its handshakes."""
        sock.curve_secretkey = self._keys.secret
        sock.curve_publickey = self._keys.public
        sock.curve_server = True
        sock.zap_domain = _DOMAIN
        monitor = sock.get_monitor_socket(_MONITORED)
        self._monitors.append(monitor)
        self._tasks.append(asyncio.ensure_future(self._watch(monitor)))

    def reload(self, why: str) -> bool:
        """Read the authorized keys again; on failure keep the previous ones. True if read."""
        if self._dir is None or self._auth is None:
            return False
        self._seen = _fingerprint(self._dir)
        try:
            keys = read_public_keys(self._dir)
        except ValueError as exc:
            self._log.error(
                "authorized CURVE keys not reloaded (%s), keeping the %d loaded: %s",
                why,
                self.authorized,
                exc,
            )
            return False
        # What configure_curve sets, without its silent failure. pyzmq looks the keys up by
        # the sockets' ZAP domain itself ("*" is not a wildcard there).
        self._auth.certs[_DOMAIN.decode()] = keys
        self._auth.allow_any = False
        if why != "start":  # at start, the listening line says how many
            self._log.info("authorized CURVE keys (%s): %d from %s", why, len(keys), self._dir)
        self.authorized = len(keys)
        return True

    async def _watch_dir(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            if _fingerprint(self._dir) != self._seen:  # type: ignore[arg-type]
                self.reload("changed")

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            except Exception:  # a malformed monitor message: not worth stopping for
                continue
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                reason = "unknown_key"
            elif (
                kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
            ):
                reason = "no_curve"
            else:
                reason = "handshake"
            self.denied[reason] += 1
            peer = event.get("endpoint", b"")
            self._log.warning(
                "refused a collector connection (%s) on %s",
                reason,
                peer.decode("utf-8", "replace") if isinstance(peer, bytes) else peer,
            )

    def close(self) -> None:
        """Stop watching and the ZAP handler; the sockets themselves are the receiver's."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._monitors.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
