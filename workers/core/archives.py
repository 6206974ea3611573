"""Dataset archives (.zip, .tar, .tar.gz ...) read safely: every member is checked before anything is written.

Only regular files and folders; no links, devices, absolute paths or `..`; caps on the member count, the total
unpacked size (at most a ratio of the archive's own size, the job's cap, and what the disk can spare) and each zip
member's compression ratio, so a decompression bomb is refused up front, before it fills a disk.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tuneforge.workers.core.errors import InvalidDataset, JobFailure
from tuneforge.workers.messages import DataFile, RunJob

DISK_RESERVE_BYTES = 256 << 20
"""Free space an unpacked archive must leave on the worker's disk (checkpoints and the artifact still need room)."""
RATIO_CHECKED_ABOVE_BYTES = 1 << 20
"""Archives that unpack to less than this are not held to the ratio: they cannot fill a disk."""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold."""

    max_members: int = 200_000
    max_unpacked_bytes: int = 32 << 30
    """The most any archive unpacks to; the job's own cap (its tenant's storage quota) may be lower."""
    max_compression_ratio: float = 100.0
    """The whole archive, and each zip member over 1 MiB, may not unpack to more than this many times its stored
    size (text compresses about 10 times, media hardly at all; zero-filled bombs a thousand times)."""


def archive_limits(job: RunJob) -> ArchiveLimits:
    """The limits for this job's archives: the worker's, lowered to the job's own cap when it has one."""
    limits = ArchiveLimits()
    if 0 < job.max_unpacked_bytes < limits.max_unpacked_bytes:
        return ArchiveLimits(max_unpacked_bytes=job.max_unpacked_bytes)
    return limits


def _check_name(archive: str, name: str) -> None:
    path = PurePosixPath(name)  # `.` and `./` (what `tar -C dir -czf x.tgz .` starts with) have no parts
    if path.is_absolute() or ".." in path.parts or name.startswith("\\") or ":" in "".join(path.parts[:1]):
        raise InvalidDataset(f"{archive}: member {name!r} points outside the archive")


def _check_totals(archive: str, count: int, total: int, stored_bytes: int, limits: ArchiveLimits, target: Path) -> None:
    if count > limits.max_members:
        raise InvalidDataset(f"{archive}: {count} members is more than the limit of {limits.max_members}")
    if total > limits.max_unpacked_bytes:
        raise InvalidDataset(
            f"{archive}: unpacks to {total:,} bytes, more than the limit of {limits.max_unpacked_bytes:,}"
        )
    if total > RATIO_CHECKED_ABOVE_BYTES and total > limits.max_compression_ratio * max(1, stored_bytes):
        raise InvalidDataset(
            f"{archive}: unpacks to {total:,} bytes, {total / max(1, stored_bytes):,.0f} times its {stored_bytes:,} "
            f"bytes (at most {limits.max_compression_ratio:g} times), which looks like a decompression bomb"
        )
    _check_disk(archive, target, total)


def _check_disk(archive: str, target: Path, total: int) -> None:
    """The unpacked data must leave the disk its reserve: fail now, not half-way with ENOSPC."""
    free = shutil.disk_usage(target).free
    if total + DISK_RESERVE_BYTES > free:
        raise JobFailure(
            "DISK_FULL",
            f"{archive} unpacks to {total:,} bytes but the worker's disk has {free:,} bytes free (and keeps "
            f"{DISK_RESERVE_BYTES:,} in reserve); free space on the worker or split the data set",
        )


def _check_tar(
    archive: str, tar: tarfile.TarFile, stored: int, limits: ArchiveLimits, target: Path
) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        _check_name(archive, member.name)
        if member.issym() or member.islnk():
            raise InvalidDataset(f"{archive}: member {member.name!r} is a link; only files and folders are allowed")
        if not (member.isfile() or member.isdir()):
            raise InvalidDataset(f"{archive}: member {member.name!r} is not a regular file or folder")
    _check_totals(archive, len(members), sum(m.size for m in members), stored, limits, target)
    return members


def _check_zip(
    archive: str, zipped: zipfile.ZipFile, stored: int, limits: ArchiveLimits, target: Path
) -> list[zipfile.ZipInfo]:
    members = zipped.infolist()
    for member in members:
        _check_name(archive, member.filename)
        if (member.external_attr >> 16) & 0o170000 == 0o120000:
            raise InvalidDataset(f"{archive}: member {member.filename!r} is a link; only files and folders are allowed")
        if member.file_size > 1 << 20 and member.file_size > limits.max_compression_ratio * max(
            1, member.compress_size
        ):
            ratio = member.file_size / max(1, member.compress_size)
            raise InvalidDataset(
                f"{archive}: member {member.filename!r} unpacks {ratio:,.0f} times larger than it is stored, "
                "which looks like a decompression bomb"
            )
    _check_totals(archive, len(members), sum(m.file_size for m in members), stored, limits, target)
    return members


def extract_archive(file: DataFile, target: Path, limits: ArchiveLimits | None = None) -> Path:
    """Checks and unpacks a dataset archive into target; returns the data root (a lone top folder is entered)."""
    limits = limits or ArchiveLimits()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    stored = Path(file.path).stat().st_size
    try:
        if zipfile.is_zipfile(file.path):
            with zipfile.ZipFile(file.path) as zipped:
                zipped.extractall(target, members=_check_zip(file.filename, zipped, stored, limits, target))
        elif tarfile.is_tarfile(file.path):
            with tarfile.open(file.path, "r:*") as tar:
                checked = _check_tar(file.filename, tar, stored, limits, target)
                tar.extractall(target, members=checked, filter="data")
        else:
            raise InvalidDataset(f"{file.filename}: not a zip or tar archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InvalidDataset(f"{file.filename}: damaged archive ({exc})") from exc
    return data_root(target)


def data_root(folder: Path) -> Path:
    """Archives made by zipping a folder hold one top folder: the data starts inside it."""
    entries = [p for p in folder.iterdir() if not is_hidden(p.name)]
    if len(entries) == 1 and entries[0].is_dir():
        return data_root(entries[0])
    return folder


def is_hidden(name: str) -> bool:
    """Files archivers add that are not data (`.DS_Store`, `__MACOSX/`, `._x`)."""
    return name.startswith(".") or name == "__MACOSX"
