"""Files, checkpoints and artifacts in object storage through fsspec (`s3://bucket/prefix`, `gs://...`), so that
workers on other machines read datasets and write checkpoints where every replica and worker can reach them.

Layout under the root URL, as in the local directory: `files/{id}`, `work/{job}/checkpoints/`,
`work/{job}/attempt-{n}/artifact.tar`, `artifacts/{job}.tar`. Uploads are staged in a local file (size and
SHA-256 are checked there) and put in place in one request; an object appears whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneforge.server.storage import CHUNK_BYTES, AttemptPlaces, Upload
from tuneforge.workers.remote_storage import filesystem


class ObjectStorage:
    """The server's bytes under one object-storage URL; only in-flight uploads stay on local disk."""

    def __init__(self, root_url: str, options: dict[str, Any], staging_dir: Path):
        self.root_url = root_url.rstrip("/")
        self.options = options
        self.fs, self._root = filesystem(self.root_url, options)
        self._uploads = staging_dir / "uploads"
        self._uploads.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        """Fails at start (OSError) when the location cannot be listed or written: a wrong endpoint, bucket or key."""
        probe = f"{self._root}/.tuneforge-probe"
        self.fs.pipe_file(probe, b"ok")
        self.fs.rm(probe)

    def _url(self, *parts: str) -> str:
        return "/".join([self.root_url, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self._root, *parts])

    def discard_partial_uploads(self) -> int:
        leftovers = list(self._uploads.iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def begin_upload(self) -> Upload:
        return Upload(self._uploads)

    def commit_upload(self, upload: Upload, file_id: str) -> None:
        upload.finish()
        self.fs.put_file(str(upload.path), self._path("files", file_id))
        upload.discard()

    def file_location(self, file_id: str) -> str:
        return self._url("files", file_id)

    def read_file(self, file_id: str) -> Iterator[bytes]:
        return self._read(self._path("files", file_id))

    def delete_file(self, file_id: str) -> None:
        self._remove(self._path("files", file_id))

    def prepare_attempt(self, job_id: str, attempt: int) -> AttemptPlaces:
        return AttemptPlaces(
            work_dir="",
            checkpoint_dir=self._url("work", job_id, "checkpoints"),
            artifact=self._url("work", job_id, f"attempt-{attempt}", "artifact.tar"),
        )

    def promote_artifact(self, job_id: str, attempt: int) -> None:
        source = self._path("work", job_id, f"attempt-{attempt}", "artifact.tar")
        self.fs.copy(source, self._path("artifacts", f"{job_id}.tar"))
        self._remove(source)

    def has_artifact(self, job_id: str) -> bool:
        return bool(self.fs.exists(self._path("artifacts", f"{job_id}.tar")))

    def artifact_location(self, job_id: str) -> str:
        return self._url("artifacts", f"{job_id}.tar")

    def checkpoint_location(self, job_id: str) -> str:
        return self._url("work", job_id, "checkpoints")

    def export_location(self, job_id: str, name: str) -> str:
        return self._url("exports", job_id, name)

    def read_location(self, location: str) -> Iterator[bytes]:
        return self._read(self._path(*location.removeprefix(self.root_url + "/").split("/")))

    def read_artifact(self, job_id: str) -> Iterator[bytes]:
        return self._read(self._path("artifacts", f"{job_id}.tar"))

    def delete_work_dir(self, job_id: str, attempt: int) -> None:
        self._remove(self._path("work", job_id, f"attempt-{attempt}"), recursive=True)

    def delete_work(self, job_id: str) -> None:
        self._remove(self._path("work", job_id), recursive=True)

    def delete_job_data(self, job_id: str) -> None:
        self.delete_work(job_id)
        self._remove(self._path("artifacts", f"{job_id}.tar"))
        self._remove(self._path("exports", job_id), recursive=True)

    def _read(self, path: str) -> Iterator[bytes]:
        with self.fs.open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk

    def _remove(self, path: str, recursive: bool = False) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)
