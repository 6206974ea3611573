"""`tuneforge serve`: the server's command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from tuneforge.server import settings_cli
from tuneforge.server.app import serve
from tuneforge.server.settings import SettingsError
from tuneforge.workers.logs import configure_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting's flag, made from its one definition (server/settings.py)."""
    settings_cli.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format, "server")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = settings_cli.settings_from_args(args)
    try:
        asyncio.run(serve(settings))
    except SettingsError as exc:
        print(f"tuneforge serve: {exc}", file=sys.stderr)
        return 2
    return 0
