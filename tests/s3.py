"""A local S3-compatible server (moto's server mode) on a free loopback port, for object-storage tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tuneforge.workers.core.distributed import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    @property
    def options(self) -> dict[str, str]:
        """fsspec options for s3:// URLs on this server."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Starts moto's server and returns once it says it is running (its own log line, not a timer)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **CREDENTIALS},
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "Running on" in line:
                break
        else:
            raise RuntimeError(f"moto's server exited with {process.wait()} before it ran")
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        process.kill()
        process.wait()
