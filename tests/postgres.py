"""A private PostgreSQL server for the tests: its own cluster in a temporary folder, on 127.0.0.1 and a free port,
stopped at the end. Uses Debian's `postgresql` package (.ci/run installs it); as root it runs as `postgres`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (the Makefile does as root)")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    folder: Path
    port: int
    bin: Path
    as_postgres: list[str]

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://tuneforge@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://tuneforge@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(
            [*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PostgresServer:
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))  # under /tmp: the postgres user can reach it
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    bin_dir, port = postgres_bin(), _free_port()
    run = {"check": True, "capture_output": True}
    subprocess.run(
        [*as_postgres, str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "tuneforge", "-A", "trust", "-N"],
        **run,  # type: ignore[arg-type]
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run(
        [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-o", options, "-l", str(folder / "log"),
         "-w", "start"],
        **run,  # type: ignore[arg-type]
    )  # fmt: skip
    return PostgresServer(folder, port, bin_dir, as_postgres)
