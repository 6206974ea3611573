"""Dataset archives (.zip, .tar, .tar.gz ...) read safely: every member is checked before anything is written.

Only regular files and folders; no links, devices, absolute paths or `..`; caps on the member count, the total
unpacked size and (for zip) each member's compression ratio, so a decompression bomb is refused up front.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from workers.core.errors import InvalidDataset
from workers.messages import DataFile


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold."""

    max_members: int = 200_000
    max_unpacked_bytes: int = 32 << 30
    max_compression_ratio: float = 200.0
    """Zip members larger than 1 MiB may not unpack to more than this many times their compressed size."""


def _check_name(archive: str, name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith("\\") or ":" in path.parts[0]:
        raise InvalidDataset(f"{archive}: member {name!r} points outside the archive")


def _check_totals(archive: str, count: int, total: int, limits: ArchiveLimits) -> None:
    if count > limits.max_members:
        raise InvalidDataset(f"{archive}: {count} members is more than the limit of {limits.max_members}")
    if total > limits.max_unpacked_bytes:
        raise InvalidDataset(
            f"{archive}: unpacks to {total:,} bytes, more than the limit of {limits.max_unpacked_bytes:,}"
        )


def _check_tar(archive: str, tar: tarfile.TarFile, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        _check_name(archive, member.name)
        if member.issym() or member.islnk():
            raise InvalidDataset(f"{archive}: member {member.name!r} is a link; only files and folders are allowed")
        if not (member.isfile() or member.isdir()):
            raise InvalidDataset(f"{archive}: member {member.name!r} is not a regular file or folder")
    _check_totals(archive, len(members), sum(m.size for m in members), limits)
    return members


def _check_zip(archive: str, zipped: zipfile.ZipFile, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
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
    _check_totals(archive, len(members), sum(m.file_size for m in members), limits)
    return members


def extract_archive(file: DataFile, target: Path, limits: ArchiveLimits | None = None) -> Path:
    """Checks and unpacks a dataset archive into target; returns the data root (a lone top folder is entered)."""
    limits = limits or ArchiveLimits()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(file.path):
            with zipfile.ZipFile(file.path) as zipped:
                members = _check_zip(file.filename, zipped, limits)
                zipped.extractall(target, members=members)
        elif tarfile.is_tarfile(file.path):
            with tarfile.open(file.path, "r:*") as tar:
                tar.extractall(target, members=_check_tar(file.filename, tar, limits), filter="data")
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
