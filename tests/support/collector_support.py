"""Shared helpers for the collector's CPU tests: a real PULL receiver, a host+seeds model,
float64 references, free ports and a bounded subprocess runner."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import zmq
from torch import nn

from esper_telemetry import Event, Goodbye, decode

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent


class Receiver:
    """The daemon's side of the wire, reduced to a PULL socket; every wait is bounded."""

    def __init__(self, sock: zmq.Socket, endpoint: str) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.events: list[Event] = []  # everything received so far, in order
        self.sizes: list[int] = []  # the size of each message received, in bytes

    def recv_once(self, timeout_s: float) -> list[Event]:
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return []
        data = self.sock.recv(zmq.NOBLOCK)
        self.sizes.append(len(data))
        got = decode(data)
        self.events.extend(got)
        return got

    def until(self, pred: Callable[[Event], bool], timeout_s: float = 5.0) -> list[Event]:
        """Receive until an event satisfies ``pred``; returns every event received so far."""
        deadline = time.monotonic() + timeout_s
        if any(pred(e) for e in self.events):
            return list(self.events)
        while time.monotonic() < deadline:
            got = self.recv_once(min(0.05, max(0.0, deadline - time.monotonic())))
            if any(pred(e) for e in got):
                return list(self.events)
        raise AssertionError(f"timed out after {timeout_s}s; received {self.events!r}")

    def until_goodbyes(self, n: int = 1, timeout_s: float = 5.0) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while sum(isinstance(e, Goodbye) for e in self.events) < n:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"expected {n} Goodbye(s) in {timeout_s}s; got {self.events!r}"
                )
            self.recv_once(0.05)
        return list(self.events)

    def quiet(self, quiet_s: float = 0.3) -> list[Event]:
        """Receive until nothing arrives for ``quiet_s`` seconds."""
        while self.recv_once(quiet_s):
            pass
        return list(self.events)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


@contextlib.contextmanager
def pull_receiver() -> Iterator[Receiver]:
    """A PULL socket on a random loopback port, wrapped as a ``Receiver``; always closed."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield Receiver(sock, f"tcp://127.0.0.1:{port}")
    finally:
        sock.close(linger=0)
        ctx.term()


class HostSeeds(nn.Module):
    """A host network and two seeds that train on detached host features.

    The losses square their outputs so gradients depend on the weights (two seeds fed the
    same features would otherwise get equal gradients).
    """

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.host = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h))
        self.seeds = nn.ModuleDict(
            {
                "a": nn.Linear(h, 4),
                "b": nn.Sequential(nn.Linear(h, 6), nn.Tanh(), nn.Linear(6, 3)),
            }
        )
        self.d = d

    def forward(self, x: torch.Tensor, leak: bool = False) -> torch.Tensor:
        h = self.host(x)
        f = h if leak else h.detach()
        loss = h.pow(2).mean()
        for seed in self.seeds.values():
            loss = loss + seed(f).pow(2).mean() * 3.0
        return loss


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> HostSeeds:
    torch.manual_seed(seed)
    return HostSeeds().to(dtype)


def train_step(model: HostSeeds, seed: int = 0, batch: int = 5, leak: bool = False) -> torch.Tensor:
    """Forward and backward on a reproducible batch; returns the loss."""
    gen = torch.Generator().manual_seed(1000 + seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch, model.d, generator=gen).to(dtype)
    loss = model(x, leak=leak)
    loss.backward()
    return loss


def ref_sq(params: Iterable[torch.Tensor]) -> float | None:
    """The float64 reference: sum of squared gradient entries, None when no gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return math.fsum(float(g.detach().to(torch.float64).pow(2).sum()) for g in grads)


def numel(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def rel_err(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-300)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    # The package comes from the environment, as a user's would; only the test helpers
    # (tests/support) are added, never the repository root.
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.pop("ESPER_TELEMETRY_ENDPOINT", None)
    env.pop("ESPER_RUN", None)
    env.update(extra)
    return env


def run_script(
    path: Path, args: Sequence[str] = (), timeout_s: float = 30.0, **env: str
) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh interpreter; a hang fails the test instead of blocking it."""
    try:
        return subprocess.run(
            [sys.executable, str(path), *args],
            cwd=str(REPO),
            env=subprocess_env(**env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{path.name} did not finish within {timeout_s}s: "
            f"stdout={exc.stdout!r} stderr={exc.stderr!r}"
        ) from None
