"""The machine's processes from /proc (Linux): tests find workers, helper ranks and Ray nodes' processes by parent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Process:
    pid: int
    parent: int
    name: str
    """/proc/PID/comm: workers name themselves `tf-worker-N`, helper ranks `tf-rank-N`."""


def processes() -> list[Process]:
    """Every process that could be read (one may end while the table is read)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            name = (entry / "comm").read_text().strip()
        except (OSError, IndexError, ValueError):
            continue
        found.append(Process(int(entry.name), parent, name))
    return found


def descendants(root: int) -> list[int]:
    """Every live process below root."""
    children: dict[int, list[int]] = {}
    for process in processes():
        children.setdefault(process.parent, []).append(process.pid)
    found, frontier = [], [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found
