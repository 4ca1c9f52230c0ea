"""A setting declared once: the row, value parsers with their bounds, and what rows derive.

A ``Setting`` is everything about one setting: its flag, its ``ESPER_*`` variable (named
after the flag: ``--run.ttl-seconds`` is ``ESPER_RUN_TTL_SECONDS``), its default as a user
would write it, its unit, the parser that turns text into the value (bounds included) and
its help. From a sequence of rows come the command line (``build_parser``), the resolved
and validated values (``resolve``) and the README's flags table (``flags_table``);
``config.py`` declares the daemon's rows as the fields of its ``Config``, and the deploy
files' tests read them. Values resolve by ``esper_telemetry.defaults.lookup``, the rule the
collector uses too: the flag, then the variable, then the default.

A parser raises ``ValueError`` with a reason that quotes the value; ``resolve`` turns it into
a ``ConfigError`` naming what the user wrote: the flag, or the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from esper_telemetry.defaults import lookup

__all__ = [
    "ConfigError",
    "Setting",
    "Switch",
    "setting",
    "env_name",
    "rows_of",
    "build_parser",
    "resolve",
    "flags_table",
    "integer",
    "number",
    "one_of",
]

_ROW = "esper_setting"


class ConfigError(ValueError):
    """Invalid configuration; the message is one line naming the flag or the variable."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting. ``parse`` takes the text (a tuple of texts if ``repeatable``)."""

    flag: str
    env: str
    default: str  # as a user would write it; the README shows it as is
    parse: Callable[[Any], Any]
    help: str  # Markdown: the README's meaning column; --help shows it without backticks
    metavar: str
    unit: str = ""  # after the default in --help ("300 seconds")
    repeatable: bool = False  # the flag may repeat; the variable is a comma-separated list
    name: str = ""  # the config field; ``rows_of`` fills it in from the field's name

    def where(self, source: str) -> str:
        """What the user wrote, for an error: the variable when the value came from it."""
        return self.env if source == "environment" else self.flag


@dataclasses.dataclass(frozen=True)
class Switch:
    """A flag that is an action, not a setting (``--check-config``, ``--version``)."""

    flag: str
    help: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def env_name(flag: str) -> str:
    """The variable of a flag: ``--zmq.curve.secret-key-file`` is
    ``ESPER_ZMQ_CURVE_SECRET_KEY_FILE``."""
    return "ESPER_" + flag.removeprefix("--").replace(".", "_").replace("-", "_").upper()


def setting(
    flag: str,
    default: object,
    parse: Callable[[Any], Any],
    help: str,
    metavar: str,
    unit: str = "",
    repeatable: bool = False,
) -> Any:
    """A dataclass field declared by its row: its default is the row's default, parsed."""
    row = Setting(flag, env_name(flag), _text(default), parse, help, metavar, unit, repeatable)
    try:
        value = row.parse(_split(row.default) if repeatable else row.default)
    except ValueError as exc:  # a bug in the table, found at import
        raise AssertionError(f"default of {flag} is invalid: {exc}") from None
    return dataclasses.field(default=value, metadata={_ROW: row})


def rows_of(cls: type) -> tuple[Setting, ...]:
    """The rows declared on ``cls``'s fields, in field order, each named after its field."""
    return tuple(
        dataclasses.replace(f.metadata[_ROW], name=f.name)
        for f in dataclasses.fields(cls)
        if _ROW in f.metadata
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # one line, no usage
        raise ConfigError(message)


def build_parser(
    rows: Sequence[Setting], switches: Sequence[Switch] = (), prog: str = "", description: str = ""
) -> argparse.ArgumentParser:
    """The command line: one flag per row, its help naming the variable and the default.

    Abbreviations are refused: a flag is accepted only as spelled, so a typo is an error
    rather than whichever flag it happens to prefix.
    """
    p = _Parser(prog=prog or None, description=description or None, allow_abbrev=False)
    for row in rows:
        default = f"{row.default} {row.unit}" if row.unit else row.default
        env = f"{row.env}, comma-separated" if row.repeatable else row.env
        text = f"{_plain(row.help)} (env {env}; default {default})"
        p.add_argument(
            row.flag,
            dest=row.name,
            default=None,
            metavar=row.metavar,
            help=text.replace("%", "%%"),
            **({"action": "append"} if row.repeatable else {}),
        )
    for switch in switches:
        p.add_argument(
            switch.flag, help=_plain(switch.help).replace("%", "%%"), **dict(switch.options)
        )
    return p


def resolve(
    rows: Sequence[Setting], given: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Every row's value, by field name: ``given[name]`` (the flag), else the variable, else
    the default, parsed; ``ConfigError`` naming the flag or the variable otherwise."""
    values: dict[str, Any] = {}
    for row in rows:
        flag_value = given.get(row.name)
        if row.repeatable and flag_value is not None:
            values[row.name] = _parse(row, tuple(flag_value), "argument")
            continue
        raw, source = lookup(row.env, row.default, flag_value, environ)
        values[row.name] = _parse(row, _split(raw) if row.repeatable else raw, source)
    return values


def flags_table(rows: Sequence[Setting], switches: Sequence[Switch] = ()) -> str:
    """The README's flags table (Markdown), one line per row, then one per switch."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for row in rows:
        env = f"`{row.env}`" + (" (comma-separated list)" if row.repeatable else "")
        lines.append(f"| `{row.flag}` | {env} | `{row.default}` | {row.help} |")
    for switch in switches:
        lines.append(f"| `{switch.flag}` | | | {switch.help} |")
    return "\n".join(lines) + "\n"


def _parse(row: Setting, raw: Any, source: str) -> Any:
    try:
        return row.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{row.where(source)}: {exc}") from None


def _split(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _text(default: object) -> str:
    return f"{default:g}" if isinstance(default, float) else str(default)


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


# --- value parsers: text in, value out, ValueError with a reason quoting the text ---------


def integer(minimum: int = 1) -> Callable[[str], int]:
    """A whole number of at least ``minimum``."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
        if value < minimum:
            raise ValueError(f"{raw!r} must be at least {minimum}")
        return value

    return parse


def number(minimum: float) -> Callable[[str], float]:
    """A finite number of at least ``minimum``."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not value >= minimum or math.isinf(value):  # NaN fails the comparison
            raise ValueError(f"{raw!r} must be a finite number >= {minimum:g}")
        return value

    return parse


def one_of(
    options: Sequence[str], aliases: Mapping[str, str] | None = None
) -> Callable[[str], str]:
    """One of ``options``, case-insensitive; ``aliases`` map other spellings onto them."""

    def parse(raw: str) -> str:
        value = raw.lower()
        value = (aliases or {}).get(value, value)
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return value

    return parse
