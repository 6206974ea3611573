"""A job whose files, checkpoints and artifact live in object storage (fsspec URLs such as `s3://bucket/prefix`),
so that a worker on any machine can run it.

The training core reads and writes local paths. Before an attempt, its inputs are downloaded into local scratch
space and the newest complete checkpoint comes down beside them; after each checkpoint the worker pushes it up
(the weights and state first, `trainer_state.json` last: a checkpoint without it is not complete), and a finished
attempt uploads its artifact. Locations that are already local paths pass through untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from tuneforge.workers.messages import CheckpointWritten, DataFile, RunJob, WorkerEvent

log = logging.getLogger(__name__)

POSITION = "trainer_state.json"
"""Written last in a checkpoint folder (workers.core.checkpoints names it so too)."""


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def filesystem(url: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem behind a URL and the path in it. Listings are not cached: other processes and machines
    write the same prefixes."""
    fs, path = url_to_fs(url, **{"use_listings_cache": False, **options})
    return fs, str(path)


@dataclass
class RemoteAttempt:
    """The links between one attempt's local scratch space and its remote locations."""

    job: RunJob
    """The job as the training core sees it: every path local."""
    options: dict[str, Any]
    remote_checkpoints: str = ""
    remote_artifact: str = ""
    scratch: Path | None = None
    """Scratch space this worker made for the attempt (removed at the end)."""
    pushed_best: int = 0
    """Modification time (ns) of the best weights last pushed: unchanged best weights are not uploaded again."""

    def send_through(self, send: Callable[[WorkerEvent], None]) -> Callable[[WorkerEvent], None]:
        """Wraps the event sink: a checkpoint reaches object storage before the server hears of it."""
        if not self.remote_checkpoints:
            return send

        def mirrored(event: WorkerEvent) -> None:
            if isinstance(event, CheckpointWritten):
                remote = self.push_checkpoint(Path(event.path))
                event = dataclasses.replace(event, path=remote)
            send(event)

        return mirrored

    def push_checkpoint(self, folder: Path) -> str:
        """Uploads a checkpoint folder (position last), everything else beside it (best weights, automatic choices,
        memory plan), then removes remote checkpoints older than the ones kept."""
        fs, root = filesystem(self.remote_checkpoints, self.options)
        local_root = folder.parent
        target = f"{root}/{folder.name}"
        _put_folder(fs, folder, target)
        best_position = local_root / "best" / POSITION
        if best_position.exists() and best_position.stat().st_mtime_ns != self.pushed_best:
            _put_folder(fs, best_position.parent, f"{root}/best")
            self.pushed_best = best_position.stat().st_mtime_ns
        serving = local_root / "serving"  # what Predict needs to rebuild the model from a checkpoint
        if serving.is_dir() and not fs.exists(f"{root}/serving/job_spec.json"):
            _put_folder(fs, serving, f"{root}/serving")
        for extra in local_root.glob("*.json"):
            fs.put_file(str(extra), f"{root}/{extra.name}")
        kept = {p.name for p in local_root.glob("step-*")}
        for remote in _remote_steps(fs, root):
            if remote.rsplit("/", 1)[-1] not in kept:
                fs.rm(remote, recursive=True)
        return f"{self.remote_checkpoints}/{folder.name}"

    def pull_checkpoints(self) -> None:
        """Brings down the newest complete remote checkpoint, the best weights and the small JSON files."""
        fs, root = filesystem(self.remote_checkpoints, self.options)
        local = Path(self.job.checkpoint_dir)
        local.mkdir(parents=True, exist_ok=True)
        if not fs.exists(root):
            return
        complete = [step for step in _remote_steps(fs, root) if fs.exists(f"{step}/{POSITION}")]
        if complete:
            newest = max(complete, key=lambda step: step.rsplit("/", 1)[-1])
            get_folder(fs, newest, local / newest.rsplit("/", 1)[-1])
        if fs.exists(f"{root}/best/{POSITION}"):
            get_folder(fs, f"{root}/best", local / "best")
        for entry in fs.ls(root, detail=False):
            if str(entry).endswith(".json"):
                fs.get_file(entry, str(local / str(entry).rsplit("/", 1)[-1]))

    def push_artifact(self) -> None:
        if self.remote_artifact:
            fs, path = filesystem(self.remote_artifact, self.options)
            fs.put_file(self.job.artifact_path, path)

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _put_folder(fs: fsspec.AbstractFileSystem, folder: Path, target: str) -> None:
    files = sorted(folder.iterdir(), key=lambda f: f.name == POSITION)  # the position goes up last
    for file in files:
        fs.put_file(str(file), f"{target}/{file.name}")


def get_folder(fs: fsspec.AbstractFileSystem, source: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for entry in fs.ls(source, detail=False):
        fs.get_file(entry, str(folder / str(entry).rsplit("/", 1)[-1]))


def _remote_steps(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    if not fs.exists(root):
        return []
    return [str(e) for e in fs.ls(root, detail=False) if str(e).rsplit("/", 1)[-1].startswith("step-")]


def localize(job: RunJob, options: dict[str, Any], scratch_root: str = "") -> RemoteAttempt:
    """The attempt with every remote location replaced by a local one (inputs downloaded, the newest checkpoint
    brought down). A job with only local paths comes back as it is."""
    remote = [job.training_data.path, job.checkpoint_dir, job.artifact_path]
    if job.validation_data is not None:
        remote.append(job.validation_data.path)
    if not any(is_remote(location) for location in remote) and job.work_dir:
        return RemoteAttempt(job, options)
    scratch = Path(tempfile.mkdtemp(prefix=f"{job.job}-{job.attempt}-", dir=scratch_root or None))
    inputs = scratch / "inputs"
    inputs.mkdir()

    def fetched(data: DataFile | None, name: str) -> DataFile | None:
        if data is None or not is_remote(data.path):
            return data
        fs, path = filesystem(data.path, options)
        fs.get_file(path, str(inputs / name))
        return DataFile(str(inputs / name), data.filename)

    training = fetched(job.training_data, "training")
    assert training is not None
    local = dataclasses.replace(
        job,
        training_data=training,
        validation_data=fetched(job.validation_data, "validation"),
        work_dir=job.work_dir or str(scratch / "work"),
        checkpoint_dir=str(scratch / "checkpoints") if is_remote(job.checkpoint_dir) else job.checkpoint_dir,
        artifact_path=str(scratch / "artifact.tar") if is_remote(job.artifact_path) else job.artifact_path,
    )
    Path(local.work_dir).mkdir(parents=True, exist_ok=True)
    attempt = RemoteAttempt(
        local,
        options,
        remote_checkpoints=job.checkpoint_dir if is_remote(job.checkpoint_dir) else "",
        remote_artifact=job.artifact_path if is_remote(job.artifact_path) else "",
        scratch=scratch,
    )
    if attempt.remote_checkpoints:
        attempt.pull_checkpoints()
    return attempt
