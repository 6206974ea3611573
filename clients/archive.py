"""Safe extraction of artifact archives: every member is checked before anything is written."""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 64 << 30


class UnsafeArchive(ValueError):
    """The archive holds something other than plain files and folders inside the target."""


def check_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Regular files and directories only, relative paths without `..`, bounded count and size."""
    members = tar.getmembers()
    if len(members) > MAX_MEMBERS:
        raise UnsafeArchive(f"{len(members)} members is more than {MAX_MEMBERS}")
    total = 0
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise UnsafeArchive(f"member {member.name!r} points outside the target folder")
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchive(f"member {member.name!r} is not a regular file or folder")
        total += member.size
    if total > MAX_TOTAL_BYTES:
        raise UnsafeArchive(f"{total} bytes unpacked is more than {MAX_TOTAL_BYTES}")
    return members


def extract_archive(archive: Path, target: Path) -> list[str]:
    """Extracts a checked tar archive into target; returns the member names."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = check_members(tar)
        tar.extractall(target, members=members, filter="data")
    return [m.name for m in members]
