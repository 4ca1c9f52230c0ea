"""What every benchmark here shares: the machine it ran on, and its section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine(*software: str) -> str:
    """The CPU's model name, cores, kernel and Python, then ``software`` (e.g. "pyzmq 27")."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return ", ".join(
        [
            f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}",
            *software,
        ]
    )


def write_section(heading: str, section: str, path: Path = RESULTS) -> None:
    """Put ``section`` (starting with ``heading``, a "## " line) in ``path``: in place of the
    section of that heading (up to the next "## "), or at the end; the others are kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
