"""One definition per setting: `tuneforge serve`'s flags, their defaults and the README's flag table all come from
server/settings.py, and a test fails when the README and `serve --help` disagree."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from tuneforge.server import settings_cli
from tuneforge.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser()
    settings_cli.add_arguments(made)
    return made


def readme_flags() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index(settings_cli.TABLE_BEGIN) : text.index(settings_cli.TABLE_END)]
    return re.findall(r"^\| `(--[a-z-]+)", table, re.M)


def test_the_readme_table_is_the_one_the_settings_make() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_cli.readme_with_table(readme) == readme, (
        "the README's flag table is stale: run `.venv/bin/python -m tuneforge.server.settings_cli --readme README.md`"
    )


def test_serve_help_lists_exactly_the_readme_flags() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "tuneforge.clients.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    in_help = sorted(set(re.findall(r"^\s+(--[a-z][a-z-]*)", shown, re.M)) - {"--help"})
    assert in_help == sorted(readme_flags())
    assert len(in_help) == sum(1 for f in settings_cli.flags()) == 44


def test_no_flags_give_the_settings_defaults() -> None:
    assert settings_cli.settings_from_args(parser().parse_args([])) == ServerSettings()


def test_flags_reach_their_settings_with_their_types() -> None:
    roots = ["--model-root", "/models/a", "--model-root", "/models/b"]
    options = ["--storage-option", "endpoint_url=http://minio:9000", "--storage-option", "max_retries=3"]
    others = ["--allow-plaintext", "--log-level", "debug", "--lease-timeout-s", "7.5", "--workers", "3"]
    args = parser().parse_args([*roots, *options, *others, "--port-file", "/tmp/port", "--pool", "ray"])
    settings = settings_cli.settings_from_args(args)
    assert settings.model_roots == (Path("/models/a"), Path("/models/b"))
    assert settings.storage_options == (("endpoint_url", "http://minio:9000"), ("max_retries", 3))
    assert (settings.allow_plaintext, settings.log_level, settings.lease_timeout_s) == (True, "DEBUG", 7.5)
    assert (settings.workers, settings.port_file, settings.pool) == (3, Path("/tmp/port"), "ray")


def test_internal_settings_have_no_flag() -> None:
    names = {flag.setting for flag in settings_cli.flags()}
    assert {"max_message_bytes", "worker_stop_s"}.isdisjoint(names)
    assert len(names) == len(ServerSettings.__dataclass_fields__) - 2
