"""``esper-telemetry top`` against a real daemon fed by a real collector.

``--once`` is run as the console script and its table parsed: every figure is checked
against what the collector measured. The live view runs in a real terminal (tmux, on a
private server socket): it draws, refreshes in place, highlights a violation, says in one
line that the daemon is gone, recovers when it is back, and quits on ``q``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from daemon_support import get  # noqa: E402
from live_daemon import LiveDaemon  # noqa: E402
from torch import nn  # noqa: E402

import esper_telemetry as et  # noqa: E402
from esper_telemetry.commands import top as top_command  # noqa: E402
from esper_telemetry.commands.daemon_process import console_script  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 10.0


class Net(nn.Module):
    """A host, two seeds and a group declared isolated that does receive gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.host = nn.Linear(6, 8)
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 3)
        self.frozen = nn.Linear(6, 4)


def attach(net: Net, run: str, endpoint: str):
    return et.attach(
        model=net,
        host="host",
        seeds={"a": "a", "b": "b"},
        groups={"frozen": "frozen"},
        isolated=("frozen",),
        run=run,
        endpoint=endpoint,
    )


def train(tel, net: Net, steps: range, nan_steps=()) -> None:
    for step in steps:
        x = torch.randn(16, 6)
        b = net.b(x).pow(2).mean() * (float("nan") if step in nan_steps else 1.0)
        loss = net.host(x).pow(2).mean() + 3 * net.a(x).sum() + b + 1e-3 * net.frozen(x).sum()
        net.zero_grad(set_to_none=True)
        loss.backward()
        tel.capture(step)


def top(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
    return subprocess.run(
        [*console_script("esper-telemetry", "esper_telemetry.commands.cli"), "top", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def table(out: str) -> tuple[list[tuple[str, str]], dict[tuple[str, str], dict[str, str]]]:
    """The rows of ``top --once`` in order, and each row's cells by column name."""
    lines = out.splitlines()
    header = lines[1].split()
    assert header == [
        "RUN",
        "GROUP",
        "STEP",
        "NORM",
        "RATIO",
        "MAX",
        "SPIKES",
        "NONFINITE",
        "ISOLATION",
        "DEVICE",
        "DROPS",
        "AGE",
        "TREND",
    ]
    order, rows = [], {}
    for line in lines[2:]:
        cells = dict(zip(header, line.split()))
        key = (cells["RUN"], cells["GROUP"])
        order.append(key)
        rows[key] = cells
    return order, rows


def seconds(age: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(\d+(?:\.\d+)?)s", age)
    assert m, age
    return 60 * int(m.group(1) or 0) + float(m.group(2))


def test_once_prints_what_the_collector_measured_worst_first(daemon: LiveDaemon):
    torch.manual_seed(0)
    net, other = Net(), Net()
    steps = 6
    with (
        attach(net, "main", daemon.endpoint) as tel,
        attach(other, "other", daemon.endpoint) as tel2,
    ):
        train(tel, net, range(steps), nan_steps={1, 3})
        train(tel2, other, range(2))
        assert tel.flush(5.0) and tel2.flush(5.0)
        latest = tel.latest()
        daemon.scrape_until(
            lambda s: (
                get(s, "esper_last_step", run="main") == steps - 1
                and get(s, "esper_last_step", run="other") == 1
            ),
            "both runs",
        )
        proc = top("--once", "--url", daemon.url)
        only = top("--once", "--url", daemon.url, "--run", "oth*")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    order, rows = table(proc.stdout)
    assert proc.stdout.splitlines()[0].startswith(f"{daemon.url}  esper-telemetryd ")
    assert "runs=2 groups=8 violated=2 warnings=1" in proc.stdout.splitlines()[0]
    # Worst first: the violated groups, then the group with non-finite gradients.
    assert order[:3] == [("main", "frozen"), ("other", "frozen"), ("main", "b")]
    assert sorted(order[3:]) == [
        ("main", "a"),
        ("main", "host"),
        ("other", "a"),
        ("other", "b"),
        ("other", "host"),
    ]

    for group in ("host", "a", "b", "frozen"):
        cells = rows[("main", group)]
        assert float(cells["NORM"]) == pytest.approx(latest.groups[group].norm, rel=1e-5), group
        assert cells["STEP"] == str(steps - 1) and cells["DEVICE"] == "0" and cells["DROPS"] == "0"
        assert seconds(cells["AGE"]) < 30
        # The window's largest finite norm is at least the latest; six healthy steps spike
        # nowhere (fewer than the 8 the rule needs before it judges).
        assert float(cells["MAX"]) >= float(cells["NORM"]) * (1 - 1e-6), group
        assert cells["SPIKES"] == "0", group
    for seed in ("a", "b"):
        assert float(rows[("main", seed)]["RATIO"]) == pytest.approx(latest.ratios[seed], rel=1e-3)
        assert rows[("main", seed)]["ISOLATION"] == "ok"
    assert rows[("main", "b")]["NONFINITE"] == "2" and rows[("main", "a")]["NONFINITE"] == "0"
    assert rows[("main", "frozen")]["ISOLATION"] == f"VIOLATED({steps})"
    assert rows[("main", "host")]["ISOLATION"] == "-" and rows[("main", "host")]["RATIO"] == "-"
    assert rows[("other", "host")]["STEP"] == "1"
    # A sparkline on every row, from the history API: one character per step (fewer steps
    # than columns), '!' at b's NaN steps, blocks elsewhere.
    for (run, group), cells in rows.items():
        trend = cells["TREND"]
        assert len(trend) == (steps if run == "main" else 2), (run, group, trend)
        assert set(trend) <= set(top_command._BLOCKS) | {"!"}, (run, group, trend)
    assert [i for i, c in enumerate(rows[("main", "b")]["TREND"]) if c == "!"] == [1, 3]
    assert "!" not in rows[("main", "a")]["TREND"]

    assert only.returncode == 0
    assert {run for run, _ in table(only.stdout)[0]} == {"other"}


# -- the live view in a real terminal --------------------------------------------------------------
class Tmux:
    """One tmux server on a private socket; one window running a command, kept after it exits."""

    def __init__(self, name: str, exit_file: Path) -> None:
        self.name, self.exit_file = name, exit_file

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-L", self.name, *args], capture_output=True, text=True, timeout=10
        )
        assert proc.returncode == 0, f"tmux {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def start(self, command: str) -> None:
        self("new-session", "-d", "-s", "top", "-x", "160", "-y", "30")
        self("set-option", "-t", "top", "remain-on-exit", "on")
        # Detached, a window takes the default size (80x24) unless told otherwise.
        self("set-option", "-t", "top", "window-size", "manual")
        self("resize-window", "-t", "top", "-x", "160", "-y", "30")
        # tmux's #{pane_dead_status} and the pane's last output can be lost when a curses program
        # exits (tmux 3.3a): the shell writes the exit status to a file instead.
        self("respawn-pane", "-k", "-t", "top", f"{command}; echo $? > {self.exit_file}")

    def screen(self, escapes: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def wait(self, ok: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while True:
            screen = self.screen()
            if ok(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")
            time.sleep(0.05)

    def dead(self) -> int | None:
        """The command's exit status once it has exited (``start``'s shell writes it), else None."""
        text = self.exit_file.read_text() if self.exit_file.exists() else ""
        return int(text) if text.endswith("\n") else None

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux(tmp_path: Path) -> Tmux:
    if shutil.which("tmux") is None:
        message = "tmux is not installed: run `bash tools/ensure-tmux.sh` (Debian's tmux package)"
        if os.environ.get(
            "CI"
        ):  # `make test` installs it first; in CI a silent skip would hide the view
            pytest.fail(message + " (CI is set: this test must not skip)")
        pytest.skip(message)
    t = Tmux(f"esper-top-test-{os.getpid()}", tmp_path / "top-exit-status")
    yield t
    t.kill()


def row(screen: str, run: str, group: str) -> str | None:
    return next((ln for ln in screen.splitlines() if ln.split()[:2] == [run, group]), None)


def test_live_view_draws_refreshes_survives_a_daemon_restart_and_quits_on_q(tmux, daemon, tmp_path):
    script = " ".join(console_script("esper-telemetry", "esper_telemetry.commands.cli"))
    tmux.start(f"{script} top --url {daemon.url} --interval 0.3")
    tmux.wait(lambda s: "no runs" in s and "q: quit" in s, "the empty view")

    net = Net()
    with attach(net, "live", daemon.endpoint) as tel:
        train(tel, net, range(4))
        assert tel.flush(5.0)
        first = tmux.wait(lambda s: (row(s, "live", "host") or "").split()[2:3] == ["3"], "step 3")
        # A violation is on top and drawn highlighted (attributes, not only text).
        table_rows = [ln for ln in first.splitlines() if ln.startswith("live ")]
        assert table_rows[0].split()[:2] == ["live", "frozen"] and "VIOLATED(4)" in table_rows[0]
        frozen_line = next(ln for ln in tmux.screen(escapes=True).splitlines() if " frozen " in ln)
        assert re.match(r"^(\x1b\[[0-9;]*m)+live", frozen_line), repr(frozen_line)

        train(tel, net, range(4, 10))
        assert tel.flush(5.0)
        now = tmux.wait(lambda s: (row(s, "live", "host") or "").split()[2:3] == ["9"], "step 9")
        # Refreshed in place: one header, one row per group, the old step gone.
        assert sum(ln.split()[:2] == ["RUN", "GROUP"] for ln in now.splitlines()) == 1
        assert sum(ln.startswith("live ") for ln in now.splitlines()) == 4
        assert "VIOLATED(10)" in now
        # The live view's sparklines: a character per step on every group's row.
        blocks = set(top_command._BLOCKS)

        def sparklines(screen: str) -> bool:
            rows = [row(screen, "live", g) for g in ("host", "a", "b", "frozen")]
            return all(
                r and len(r.split()[-1]) == 10 and set(r.split()[-1]) <= blocks for r in rows
            )

        tmux.wait(sparklines, "a 10-step sparkline on every row")

    # The daemon goes away: one line says so, the view stays up and keeps retrying.
    port = int(daemon.web.rsplit(":", 1)[1])
    assert daemon.stop() == 0
    down = tmux.wait(lambda s: f"cannot reach {daemon.url}" in s, "the daemon-down line")
    assert (
        sum("cannot reach" in ln for ln in down.splitlines()) == 1 and "retrying every 0.3s" in down
    )
    assert tmux.dead() is None
    back = LiveDaemon(tmp_path / "second.log", web_port=port)
    try:
        tmux.wait(
            lambda s: "cannot reach" not in s and "no runs" in s and "q: quit" in s, "recovery"
        )
    finally:
        back.stop()

    tmux("send-keys", "-t", "top", "q")
    deadline = time.monotonic() + WAIT_S
    while tmux.dead() is None:
        assert time.monotonic() < deadline, f"top did not quit on q:\n{tmux.screen()}"
        time.sleep(0.05)
    assert tmux.dead() == 0
