"""A network namespace with only loopback, for tests whose software would otherwise bind or connect beyond
127.0.0.1 (Ray). Needs root and `ip` (iproute2)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


def can_make_namespaces() -> str:
    """Why namespaces cannot be made here ('' when they can)."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        return "needs `ip` (iproute2)"
    return ""


@contextmanager
def loopback_namespace() -> Iterator[str]:
    """Creates the namespace with `lo` up, yields its name, deletes it."""
    name = f"tf-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
