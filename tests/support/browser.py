"""A real headless Chromium driven over the DevTools protocol, for the live page's test.

Chromium (Debian's ``chromium`` package; ``tools/ensure-chromium.sh`` installs it) runs with
``--remote-debugging-pipe``: it reads protocol commands from file descriptor 3 and writes
responses and events to descriptor 4, each message JSON ended by a NUL byte. No port, no
websocket library: two pipes and a reader thread. ``Page`` is one tab: navigate, evaluate
JavaScript, wait for a condition (bounded), capture a screenshot; every console error,
uncaught exception and failed load the tab reports is kept in ``Page.errors``.

Without Chromium, ``chromium_path()`` fails under CI (``CI`` set) and skips elsewhere, as
the deploy tests do for promtool.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

COMMAND_TIMEOUT_S = 10.0


def chromium_path() -> str:
    """The Chromium executable; fails under CI and skips elsewhere when there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is missing: run `bash tools/ensure-chromium.sh` (Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: the browser test must not skip)")
        pytest.skip(message)
    return path


class ProtocolError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process; ``page()`` opens a tab. Always ``close()`` it."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads fd 3
        self._resp_r, resp_w = os.pipe()  # Chromium writes fd 4, we read

        def fds() -> None:  # in the child: the two pipe ends at 3 and 4
            os.dup2(cmd_r, 100)
            os.dup2(resp_w, 101)
            os.dup2(100, 3)
            os.dup2(101, 4)

        args = [
            chromium_path(),
            "--headless=new",
            "--no-sandbox",  # root in a container has no usable sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--mute-audio",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.log_path = profile / "chromium.log"
        profile.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(3, 4),
            preexec_fn=fds,
        )
        os.close(cmd_r)
        os.close(resp_w)
        self._next = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._listeners: list[Callable[[dict], None]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._resp_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    for listen in list(self._listeners):
                        listen(msg)

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> dict:
        with self._lock:
            self._next += 1
            ident = self._next
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ProtocolError(
                        f"{method}: no answer within {timeout_s} s"
                        + ("; chromium exited" if self._closed else "")
                    )
                self._cond.wait(left)
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        return Page(self, session, width, height)

    def close(self) -> None:
        try:
            os.close(self._cmd_w)  # Chromium exits when its command pipe closes
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        try:
            os.close(self._resp_r)
        except OSError:
            pass
        self._log.close()


class Page:
    """One tab; ``errors`` collects what the tab reported as an error."""

    def __init__(self, browser: Browser, session: str, width: int, height: int) -> None:
        self.browser, self.session = browser, session
        self.errors: list[str] = []
        self._loaded = threading.Event()
        browser._listeners.append(self._event)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def _event(self, msg: dict) -> None:
        if msg.get("sessionId") != self.session:
            return
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            text = d.get("exception", {}).get("description") or d.get("text")
            self.errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description")) for a in params.get("args", [])]
            self.errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            self.errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}")

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def navigate(self, url: str, timeout_s: float = 15.0) -> None:
        """Load ``url`` and wait for its load event."""
        self._loaded.clear()
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise ProtocolError(f"navigate {url}: {result['errorText']}")
        self.loaded(timeout_s)

    def loaded(self, timeout_s: float = 15.0) -> None:
        """Wait for the load event of the document being loaded (after ``navigate``, or a
        click on a link: clear with ``expect_load`` first)."""
        if not self._loaded.wait(timeout_s):
            raise AssertionError(f"no load event within {timeout_s} s; errors: {self.errors}")

    def expect_load(self) -> None:
        self._loaded.clear()

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise ProtocolError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout_s: float = 15.0) -> Any:
        """Evaluate until the value is truthy; fail after ``timeout_s`` saying ``what``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what} (last: {value!r}); "
                    f"page errors: {self.errors}"
                )
            time.sleep(0.1)

    def mouse(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def screenshot(self) -> bytes:
        data = self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(data["data"])
