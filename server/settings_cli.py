"""`tuneforge serve`'s flags, the settings they make, and the README's flag table: all three made from the one
definition of each setting in server/settings.py.

    python -m tuneforge.server.settings_cli --readme README.md    # rewrites the README's table after a setting changes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from tuneforge.server.settings import ServerSettings

TABLE_BEGIN = (
    "<!-- serve flags: made from server/settings.py by `python -m tuneforge.server.settings_cli --readme README.md` -->"
)
TABLE_END = "<!-- end of serve flags -->"


METAVARS: dict[Any, str] = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


@dataclasses.dataclass(frozen=True)
class Flag:
    """A setting as the command line shows it."""

    setting: str
    name: str
    kind: Any
    default: Any
    help: str
    metavar: str | None
    choices: tuple[str, ...]
    repeatable: bool


def flags() -> list[Flag]:
    hints = typing.get_type_hints(ServerSettings)
    found = []
    for definition in dataclasses.fields(ServerSettings):
        meta = definition.metadata
        if not meta.get("flag", False):
            continue
        word = definition.name.removesuffix("s") if meta["repeatable"] else definition.name
        kind = hints[definition.name]
        metavar = meta["metavar"] or (None if kind is bool or meta["choices"] else METAVARS.get(_scalar(kind), "VALUE"))
        found.append(
            Flag(
                definition.name,
                "--" + word.replace("_", "-"),
                kind,
                definition.default,
                meta["help"],
                metavar,
                meta["choices"],
                meta["repeatable"],
            )
        )
    return found


def _shown_default(flag: Flag) -> str:
    """The default as a person would type it; empty when there is nothing to show."""
    value = flag.default
    if value in (None, "", ()) or value is False:
        return ""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value} ({value >> 30} GiB)" if value % (1 << 30) == 0 else f"{value} ({value >> 20} MiB)"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in flags():
        default = _shown_default(flag)
        help_text = f"{flag.help} (default {default})" if default else flag.help
        help_text = help_text.replace("%", "%%").replace("`", "")
        options: dict[str, Any] = {"dest": flag.setting, "help": help_text}
        if flag.metavar:
            options["metavar"] = flag.metavar
        if flag.choices:
            options["choices"] = list(flag.choices)
        if flag.kind is bool:
            parser.add_argument(flag.name, action="store_true", **options)
        elif flag.repeatable:
            item = typing.get_args(flag.kind)[0]
            parser.add_argument(flag.name, action="append", type=Path if item is Path else str, default=[], **options)
        else:
            parser.add_argument(flag.name, type=_scalar(flag.kind), default=flag.default, **options)


def _scalar(kind: Any) -> Any:
    """The argparse type of a setting (`Path | None` is a Path)."""
    options = [option for option in typing.get_args(kind) if option is not type(None)] or [kind]
    return options[0]


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    values: dict[str, Any] = {}
    for flag in flags():
        value = getattr(args, flag.setting)
        if flag.setting == "storage_options":
            value = tuple(parse_option(option) for option in value)
        elif flag.repeatable:
            value = tuple(value)
        values[flag.setting] = value
    values["log_level"] = values["log_level"].upper()
    return ServerSettings(**values)


def parse_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`; the value is read as JSON when it parses (numbers, booleans, objects), else kept as text."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise SystemExit(f"tuneforge serve: --storage-option wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def flag_table() -> str:
    """The README's table of serve flags."""
    rows = [TABLE_BEGIN, "", "| flag | default | meaning |", "| --- | --- | --- |"]
    for flag in flags():
        shown = flag.name + (f" {flag.metavar}" if flag.metavar else "")
        default = _shown_default(flag)
        meaning = flag.help + (" (repeatable)" if flag.repeatable and "repeatable" not in flag.help else "")
        escaped = meaning.replace("|", "\\|")
        rows.append(f"| `{shown}` | {f'`{default}`' if default else ''} | {escaped} |")
    return "\n".join([*rows, "", TABLE_END])


def readme_with_table(text: str) -> str:
    """The README with its flag table replaced by the current one."""
    before, found, rest = text.partition(TABLE_BEGIN)
    _, ended, after = rest.partition(TABLE_END)
    if not found or not ended:
        raise ValueError(f"the README has no table between {TABLE_BEGIN!r} and {TABLE_END!r}")
    return before + flag_table() + after


def main() -> int:
    parser = argparse.ArgumentParser(description="rewrite the README's serve flag table from server/settings.py")
    parser.add_argument("--readme", type=Path, required=True)
    path = parser.parse_args().readme
    path.write_text(readme_with_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
