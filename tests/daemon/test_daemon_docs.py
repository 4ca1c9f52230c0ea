"""The README's daemon reference matches the daemon: every flag and every metric family,
both ways, so the documentation cannot drift from the code unnoticed."""

from __future__ import annotations

import re
from pathlib import Path

from daemon_support import exposition, heartbeat, hello, host_seed, parse

from esper_telemetry import IsolationViolation
from esper_telemetry.daemon.config import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"### {title}")
    end = README.index("\n#", start + 4)
    return README[start:end]


def test_every_daemon_flag_is_in_the_readme_table_and_nothing_else():
    documented = set(re.findall(r"^\| `(--[a-z.-]+)`", section("Daemon flags"), re.M))
    parser_flags = {
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    assert documented == parser_flags


def test_every_exported_family_is_in_the_readme_catalog_and_nothing_else(make_agg, clock):
    agg, _ = make_agg()
    agg.apply_batch(
        [
            hello()._replace(clip=1.0),  # a clip threshold: every run family is written
            host_seed(),
            heartbeat(dropped=1),
            IsolationViolation("r", 0, 1.0, 1, "seed", "gradient", "leak", 0.1),
        ],
        clock(),
    )
    agg.apply_batch([heartbeat()._replace(seq=0)], clock())  # a numbered message: losses
    text = exposition(agg)
    # Families by their exposed sample names, less the suffixes the catalog may or may not
    # write (counters are documented with _total).
    families = {
        re.sub(r"_(total|info|created)$", "", name)
        for name, _ in parse(text)
        if name.startswith("esper_")
    }
    catalog = set(re.findall(r"^\| `(esper_[a-z_]+)`", section("Metric catalog"), re.M))
    documented = {re.sub(r"_(total|info)$", "", name) for name in catalog}
    assert documented == families
