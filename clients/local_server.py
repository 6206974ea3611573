"""Starts a `tuneforge serve` subprocess on a free loopback port and stops it cleanly: for the demo and the tests.

The server prints one `tuneforge listening on HOST:PORT` line to stdout once it listens (after a `tuneforge metrics
on URL` line when /metrics is on); this reads those lines (with a deadline) instead of guessing ports. The metrics
endpoint gets a free port too, unless the caller chose one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_PREFIX = "tuneforge listening on "
METRICS_PREFIX = "tuneforge metrics on "


@dataclass
class LocalServer:
    """A running server process and its address."""

    process: subprocess.Popen[str]
    target: str
    data_dir: Path
    metrics_url: str = ""
    """The /metrics URL; empty when the server runs without it."""

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after timeout_s; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        return self.process.returncode


def _read_ready_lines(process: subprocess.Popen[str], timeout_s: float) -> tuple[str, str]:
    """(gRPC target, metrics URL or ""). Reads the pipe's bytes itself: the server may write both lines in one go,
    and a buffered readline would keep the second where select() cannot see it, waiting for bytes that never come."""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    metrics_url, pending = "", b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                break
            chunk = os.read(descriptor, 65536)
            if not chunk:
                raise RuntimeError(f"the server exited (code {process.wait()}) before listening; see its log")
            *lines, pending = (pending + chunk).split(b"\n")
            for line in (raw.decode(errors="replace") for raw in lines):
                if line.startswith(METRICS_PREFIX):
                    metrics_url = line.removeprefix(METRICS_PREFIX).strip()
                if line.startswith(READY_PREFIX):
                    return line.removeprefix(READY_PREFIX).strip(), metrics_url
    raise TimeoutError(f"the server did not listen within {timeout_s:.0f} s")


def _limit_memory(address_space_bytes: int) -> None:
    """In the child, before the server starts: its workers inherit the limit."""
    import resource  # POSIX only, like the limit itself

    resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes, address_space_bytes))


def start_local_server(
    data_dir: Path,
    workers: int = 1,
    model_roots: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
    port: int = 0,
    timeout_s: float = 60.0,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    address_space_bytes: int | None = None,
    cwd: Path | None = None,
) -> LocalServer:
    """Starts the server on 127.0.0.1 (port 0: a free one) and returns once it listens. `env` adds variables;
    `log_path` receives the server's and its workers' log (stderr) instead of this process's stderr;
    `address_space_bytes` limits the server's and each worker's memory (RLIMIT_AS), so a memory bomb fails there
    instead of taking the machine down; `cwd` is its working directory."""
    command = [
        sys.executable,
        "-m",
        "tuneforge.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--workers",
        str(workers),
        *extra_args,
    ]
    if "--metrics-port" not in extra_args:
        command += ["--metrics-port", "0"]
    for root in model_roots:
        command += ["--model-root", str(root)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(open(log_path, "ab")) if log_path is not None else None
        limit = None if address_space_bytes is None else functools.partial(_limit_memory, address_space_bytes)
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment, preexec_fn=limit, cwd=cwd
        )
    try:
        target, metrics_url = _read_ready_lines(process, timeout_s)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return LocalServer(process, target, data_dir, metrics_url)


@contextlib.contextmanager
def local_server(
    data_dir: Path, workers: int = 1, model_roots: Sequence[Path] = (), extra_args: Sequence[str] = ()
) -> Iterator[LocalServer]:
    """start_local_server as a context manager that always stops the process."""
    server = start_local_server(data_dir, workers, model_roots, extra_args)
    try:
        yield server
    finally:
        server.stop()
