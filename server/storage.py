"""Bytes on disk under the data dir: uploaded files, job work dirs and artifacts, always written atomically.

Layout: `files/{id}`, `uploads/` (in-flight uploads, wiped at start), `work/{job}/attempt-{n}/` (an attempt's scratch
space and artifact), `work/{job}/checkpoints/`, `artifacts/{job}.tar` (promoted from the attempt that succeeded).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK_BYTES = 1 << 20


def fsync_directory(path: Path) -> None:
    """Makes a rename in this directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Upload:
    """An upload in progress: bytes go to a temp file while size and SHA-256 are counted."""

    def __init__(self, directory: Path):
        handle, path = tempfile.mkstemp(dir=directory, prefix="upload-")
        self.path = Path(path)
        self._file: BinaryIO = os.fdopen(handle, "wb")
        self._digest = hashlib.sha256()
        self.size_bytes = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._digest.update(chunk)
        self.size_bytes += len(chunk)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def finish(self) -> None:
        """Flushes and fsyncs the content."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class AttemptPlaces:
    """Where one attempt works: local paths, or object-storage URLs for workers on other machines."""

    work_dir: str
    """Scratch space; empty: the worker makes its own."""
    checkpoint_dir: str
    artifact: str


class Storage(Protocol):
    """Where files, checkpoints and artifacts live: a local directory or object storage."""

    def discard_partial_uploads(self) -> int: ...
    def begin_upload(self) -> Upload: ...
    def commit_upload(self, upload: Upload, file_id: str) -> None: ...
    def file_location(self, file_id: str) -> str:
        """What a worker opens to read the file."""

    def read_file(self, file_id: str) -> Iterator[bytes]: ...
    def delete_file(self, file_id: str) -> None: ...
    def prepare_attempt(self, job_id: str, attempt: int) -> AttemptPlaces: ...
    def promote_artifact(self, job_id: str, attempt: int) -> None:
        """Makes the attempt's artifact the job's (only the attempt that still holds the job gets here)."""

    def has_artifact(self, job_id: str) -> bool: ...
    def artifact_location(self, job_id: str) -> str:
        """What a worker opens to read the job's artifact (Predict)."""

    def checkpoint_location(self, job_id: str) -> str:
        """The job's checkpoint folder, for Predict on a checkpoint (it may not exist yet)."""

    def export_location(self, job_id: str, name: str) -> str:
        """Where a worker writes one of the job's exports (and its metadata, with `.json` added)."""

    def read_location(self, location: str) -> Iterator[bytes]:
        """Chunks of a file at a location this storage handed out; FileNotFoundError when there is none."""

    def read_artifact(self, job_id: str) -> Iterator[bytes]: ...
    def delete_work_dir(self, job_id: str, attempt: int) -> None: ...
    def delete_work(self, job_id: str) -> None: ...
    def delete_job_data(self, job_id: str) -> None: ...


class LocalStorage:
    """All of the server's bytes in one local directory."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("files", "uploads", "work", "artifacts"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def discard_partial_uploads(self) -> int:
        """Removes uploads a previous process left half-written; returns how many."""
        leftovers = list((self.root / "uploads").iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def begin_upload(self) -> Upload:
        return Upload(self.root / "uploads")

    def commit_upload(self, upload: Upload, file_id: str) -> None:
        """Moves a finished upload into place atomically."""
        upload.finish()
        os.replace(upload.path, self.file_path(file_id))
        fsync_directory(self.root / "files")

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / file_id

    def file_location(self, file_id: str) -> str:
        return str(self.file_path(file_id))

    def read_file(self, file_id: str) -> Iterator[bytes]:
        return self.read_chunks(self.file_path(file_id))

    def prepare_attempt(self, job_id: str, attempt: int) -> AttemptPlaces:
        work, checkpoints = self.work_dir(job_id, attempt), self.checkpoint_dir(job_id)
        return AttemptPlaces(str(work), str(checkpoints), str(self.attempt_artifact_path(job_id, attempt)))

    def has_artifact(self, job_id: str) -> bool:
        return self.artifact_path(job_id).exists()

    def artifact_location(self, job_id: str) -> str:
        return str(self.artifact_path(job_id))

    def checkpoint_location(self, job_id: str) -> str:
        return str(self.root / "work" / job_id / "checkpoints")

    def export_location(self, job_id: str, name: str) -> str:
        return str(self.root / "exports" / job_id / name)

    def read_location(self, location: str) -> Iterator[bytes]:
        return self.read_chunks(Path(location))

    def read_artifact(self, job_id: str) -> Iterator[bytes]:
        return self.read_chunks(self.artifact_path(job_id))

    def delete_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)

    def work_dir(self, job_id: str, attempt: int) -> Path:
        path = self.root / "work" / job_id / f"attempt-{attempt}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact_path(self, job_id: str) -> Path:
        return self.root / "artifacts" / f"{job_id}.tar"

    def attempt_artifact_path(self, job_id: str, attempt: int) -> Path:
        """Where an attempt writes its artifact; it becomes the job's only if that attempt still holds the job."""
        return self.root / "work" / job_id / f"attempt-{attempt}" / "artifact.tar"

    def promote_artifact(self, job_id: str, attempt: int) -> None:
        """Moves the attempt's artifact into place atomically (copying first if work/ is another filesystem)."""
        source, final = self.attempt_artifact_path(job_id, attempt), self.artifact_path(job_id)
        try:
            os.replace(source, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            staging = final.with_name(f".{final.name}.tmp")
            try:
                with open(source, "rb") as reader, open(staging, "wb") as writer:
                    shutil.copyfileobj(reader, writer, CHUNK_BYTES)
                    writer.flush()
                    os.fsync(writer.fileno())
                os.replace(staging, final)
            finally:
                staging.unlink(missing_ok=True)
        fsync_directory(final.parent)

    def checkpoint_dir(self, job_id: str) -> Path:
        """The job's checkpoints, kept across attempts so that a new attempt resumes."""
        path = self.root / "work" / job_id / "checkpoints"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def delete_work_dir(self, job_id: str, attempt: int) -> None:
        """Drops an ended attempt's scratch space (its checkpoints stay with the job)."""
        shutil.rmtree(self.root / "work" / job_id / f"attempt-{attempt}", ignore_errors=True)

    def delete_work(self, job_id: str) -> None:
        """Drops all of a job's work, checkpoints included (once it has ended)."""
        shutil.rmtree(self.root / "work" / job_id, ignore_errors=True)

    def delete_job_data(self, job_id: str) -> None:
        self.delete_work(job_id)
        self.artifact_path(job_id).unlink(missing_ok=True)
        shutil.rmtree(self.root / "exports" / job_id, ignore_errors=True)

    @staticmethod
    def read_chunks(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk
