"""A process's figures as Linux reports them in /proc: what the memory and descriptor
bound tests read."""

from __future__ import annotations

import os
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    """File descriptors ``pid`` holds open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))
