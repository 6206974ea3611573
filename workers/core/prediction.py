"""Predictions from a finished job's artifact, in the worker: load the model once (a small LRU keeps the recently
used ones), turn raw inputs into the model's inputs exactly as evaluation did, and run each batch in as few
forward passes as the batch size allows.

A thread of its own serves them, so a worker answers predictions while it trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from tuneforge.workers.core.artifact import load_artifact_model
from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.core.serving import rebuild
from tuneforge.workers.messages import (
    CallCommand,
    ExportArtifact,
    ExportReady,
    GenerateBatch,
    GeneratedPiece,
    PredictBatch,
    PredictionsReady,
    StopGeneration,
    TextGenerated,
    WorkerEvent,
)
from tuneforge.workers.remote_storage import filesystem, get_folder, is_remote
from tuneforge.workers.tasks import registry
from tuneforge.workers.tasks.runtime import GeneratingRuntime, TaskRuntime, auto_class, model_class_of

log = logging.getLogger(__name__)

MAX_FORWARD_ROWS = 64
DECODED_BUDGET_BYTES = 256 << 20
"""Decoded inputs one forward pass may hold (a batch of large images is run in several passes)."""


@dataclass
class LoadedModel:
    """One artifact, ready to answer; its task's runtime decodes, batches and answers."""

    runtime: TaskRuntime
    model: Any
    processor: Any
    labels: list[str]
    data: dict[str, Any]
    """The spec's data settings (sequence length, clip length) as training used them."""

    def decode(self, item: tuple[str, Any]) -> Any:
        """One raw input made ready for the processor. InvalidDataset (or ValueError) when it cannot be read."""
        return self.runtime.decode(self, item[1])

    def batch(self, decoded: list[Any]) -> dict[str, torch.Tensor]:
        """The model's inputs for decoded items, batched and padded."""
        return self.runtime.batch(self, decoded)

    def inputs(self, items: list[tuple[str, Any]]) -> dict[str, torch.Tensor]:
        """The model's inputs for raw items (all of this model's modality), batched and padded."""
        return self.batch([self.decode(item) for item in items])

    def answer(self, decoded: list[Any], top_k: int) -> list[dict[str, Any]]:
        """The task's answers for decoded items, in one run of the model (the caller keeps batches small enough)."""
        return self.runtime.answer(self, decoded, top_k)


def load_model(folder: Path) -> LoadedModel:
    """The artifact folder's model (a custom head rebuilt) and processor, by the task its job_spec.json names."""
    spec = json.loads((folder / "job_spec.json").read_text())
    runtime = registry.runtime(spec["task"])
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    model = load_artifact_model(folder, model_class_of(runtime, config))
    return as_loaded(model, auto_class(runtime.processor_class).from_pretrained(str(folder)), spec)


def as_loaded(model: Any, processor: Any, spec: dict[str, Any]) -> LoadedModel:
    task = str(spec["task"])
    model.eval()
    classifies = registry.definition(task).classifies
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))] if classifies else []
    return LoadedModel(registry.runtime(task), model, processor, labels, spec.get("data", {}))


class ModelCache:
    """The few most recently used artifacts, unpacked and loaded; the least recently used goes first."""

    def __init__(self, capacity: int, folder: Path, storage_options: dict[str, Any]):
        self._capacity = max(1, capacity)
        self._folder = folder
        self.options = storage_options
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def folder(self, artifact: str, sha256: str) -> Path:
        """The artifact unpacked (kept with its loaded model, or unpacked now)."""
        target = self._folder / sha256 / "model"
        return target if target.is_dir() else self._unpack(artifact, self._folder / sha256)

    def get_checkpoint(self, root: str, name: str) -> LoadedModel:
        """A job's checkpoint (`latest` or `step-N`) with its serving skeleton; cached by the step it resolves to."""
        remote = is_remote(root)
        fs, base = filesystem(root, self.options) if remote else (None, root)
        listing = [str(e).rsplit("/", 1)[-1] for e in fs.ls(base, detail=False)] if fs else os.listdir(base)
        steps = sorted(n for n in listing if n.startswith("step-"))
        step = steps[-1] if name == "latest" and steps else name
        if step not in steps:
            raise InvalidDataset(f"the job has no checkpoint {name!r} (it has {', '.join(steps) or 'none'})")
        key = hashlib.sha256(f"{root}#{step}".encode()).hexdigest()  # also its folder's name
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        target = self._folder / key
        shutil.rmtree(target, ignore_errors=True)
        weights = f"{step}/model.safetensors"
        if fs is not None:
            get_folder(fs, f"{base}/serving", target / "serving")
            fs.get_file(f"{base}/{weights}", str(target / "model.safetensors"))
        else:
            shutil.copytree(Path(base) / "serving", target / "serving")
            shutil.copyfile(Path(base) / weights, target / "model.safetensors")
        model, processor, spec = rebuild(target / "serving", target / "model.safetensors")
        loaded = as_loaded(model, processor, spec)
        self._remember(key, loaded)
        return loaded

    def _remember(self, key: str, loaded: LoadedModel) -> None:
        self._models[key] = loaded
        while len(self._models) > self._capacity:
            evicted, _ = self._models.popitem(last=False)
            shutil.rmtree(self._folder / evicted, ignore_errors=True)

    def get(self, artifact: str, sha256: str) -> LoadedModel:
        if sha256 in self._models:
            self._models.move_to_end(sha256)
            return self._models[sha256]
        unpacked = self.folder(artifact, sha256)
        loaded = load_model(unpacked)
        self._remember(sha256, loaded)
        return loaded

    def _unpack(self, artifact: str, target: Path) -> Path:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        local = Path(artifact)
        if is_remote(artifact):
            fs, path = filesystem(artifact, self.options)
            local = target / "artifact.tar"
            fs.get_file(path, str(local))
        with tarfile.open(local) as tar:
            tar.extractall(target / "model", filter="data")  # written by a worker; the filter guards anyway
        return target / "model"


Served = PredictBatch | ExportArtifact | GenerateBatch
"""What the prediction thread works through, tenants in turn."""


class FairQueue:
    """Commands by tenant, served round-robin: one tenant's backlog delays another tenant's call by at most one
    of its batches, as the scheduler shares workers for training."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._queues: OrderedDict[str, deque[Served]] = OrderedDict()

    def put(self, tenant: str, command: Served) -> None:
        with self._ready:
            self._queues.setdefault(tenant, deque()).append(command)
            self._ready.notify()

    def get(self) -> Served:
        """The next tenant's oldest command (that tenant then goes to the back of the line)."""
        with self._ready:
            while not self._queues:
                self._ready.wait()
            tenant, waiting = self._queues.popitem(last=False)
            command = waiting.popleft()
            if waiting:
                self._queues[tenant] = waiting
            return command


class PredictionServer:
    """Answers Predict, Generate and export commands on its own thread, tenants in turn; a batch whose callers
    have all given up (its deadline passed) is dropped before any of its work is done, and a generation stops
    writing for each caller that goes away."""

    def __init__(self, worker: str, send: Callable[[WorkerEvent], None], cache: ModelCache, start: bool = True):
        self._worker = worker
        self._send = send
        self._cache = cache
        self._queue = FairQueue()
        self._lock = threading.Lock()
        self._gone: dict[int, set[int]] = {}
        """Rows of each generation queued or running whose callers went away."""
        if start:
            threading.Thread(target=self._serve, name="predictions", daemon=True).start()

    def submit(self, command: CallCommand) -> None:
        """Queues a call; a StopGeneration acts at once (it is read on the command thread)."""
        if isinstance(command, StopGeneration):
            with self._lock:
                if command.batch in self._gone:
                    self._gone[command.batch].update(command.rows)
            return
        if isinstance(command, GenerateBatch):
            with self._lock:
                self._gone[command.batch] = set()
        self._queue.put(command.tenant, command)

    def _serve(self) -> None:
        while True:
            self.serve_one()

    def serve_one(self) -> None:
        """Takes the next command and answers it (tests call this directly)."""
        batch = self._queue.get()
        if isinstance(batch, ExportArtifact):
            self._send(self._export(batch))
            return
        if isinstance(batch, GenerateBatch):
            self._generate(batch)
            return
        try:
            self._send(self._answer(batch))
        except Exception as exc:  # the batch fails, the thread goes on
            log.exception("prediction batch %s failed", batch.batch)
            message = f"the model could not be run: {type(exc).__name__}"
            self._send(PredictionsReady(self._worker, batch.batch, [], "INTERNAL", message))

    def _export(self, command: ExportArtifact) -> ExportReady:
        from tuneforge.workers.core.export import ExportFailed, ExportFormat, export_model

        try:
            folder = self._cache.folder(command.artifact, command.artifact_sha256)
            result = asdict(export_model(folder, ExportFormat(command.format), command.onnx_opset))
            if result["file"].startswith("exports/"):  # a file of its own goes to storage; the others are the tar
                self._store(folder / result["file"], command.destination)
            metadata = folder / "exports" / f"{command.format}.result.json"
            metadata.write_text(json.dumps(result))
            self._store(metadata, command.destination + ".json")  # last: its presence says the export is there
            return ExportReady(self._worker, command.request, result)
        except ExportFailed as failure:
            return ExportReady(self._worker, command.request, {}, failure.reason, failure.message)
        except Exception as exc:
            log.exception("export %s of %s failed", command.format, command.job)
            return ExportReady(self._worker, command.request, {}, "INTERNAL", f"{type(exc).__name__}: {exc}")

    def _store(self, file: Path, destination: str) -> None:
        if is_remote(destination):
            fs, path = filesystem(destination, self._cache.options)
            fs.put_file(str(file), path)
        else:
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
            temporary = Path(destination + ".tmp")
            shutil.copyfile(file, temporary)
            temporary.replace(destination)

    def _model_for(self, command: PredictBatch | GenerateBatch) -> LoadedModel:
        """The finished model or the checkpoint the call names. InvalidDataset or FileNotFoundError when the
        checkpoint is not there."""
        if command.checkpoint:
            return self._cache.get_checkpoint(command.artifact, command.checkpoint)
        return self._cache.get(command.artifact, command.artifact_sha256)

    def _generate(self, batch: GenerateBatch) -> None:
        """Streams the batch's answers as TextGenerated events; a failure ends every row with the batch's error."""

        def fail(reason: str, message: str) -> None:
            self._send(TextGenerated(self._worker, batch.batch, error_reason=reason, error_message=message))

        def emit(pieces: list[GeneratedPiece]) -> None:
            if pieces:
                self._send(TextGenerated(self._worker, batch.batch, tuple(pieces)))

        def gone() -> set[int]:
            if _expired(batch):
                return set(range(len(batch.requests)))
            with self._lock:
                return set(self._gone.get(batch.batch, ()))

        try:
            if len(gone()) == len(batch.requests):
                return
            try:
                model = self._model_for(batch)
            except (InvalidDataset, FileNotFoundError) as exc:
                return fail("CHECKPOINT_NOT_FOUND", str(exc))
            if not isinstance(model.runtime, GeneratingRuntime):
                return fail("NOT_GENERATIVE", "this job's model does not generate text")
            model.runtime.generate(model, batch.requests, emit, gone)
        except Exception as exc:  # the batch fails, the thread goes on
            log.exception("generation batch %s failed", batch.batch)
            fail("INTERNAL", f"the model could not be run: {type(exc).__name__}")
        finally:
            with self._lock:
                self._gone.pop(batch.batch, None)

    def _answer(self, batch: PredictBatch) -> PredictionsReady:
        if _expired(batch):
            return _too_late(self._worker, batch)
        try:
            model = self._model_for(batch)
        except (InvalidDataset, FileNotFoundError) as exc:
            return PredictionsReady(self._worker, batch.batch, [], "CHECKPOINT_NOT_FOUND", str(exc))
        results: list[dict[str, Any]] = [{} for _ in batch.inputs]
        passes = 0
        for chunk in _decoded_chunks(model, batch.inputs, results):
            if _expired(batch):
                return _too_late(self._worker, batch)
            answers = model.answer([decoded for _, decoded in chunk], batch.top_k)
            for (index, _), answer in zip(chunk, answers, strict=True):
                results[index] = answer
            passes += 1
        return PredictionsReady(self._worker, batch.batch, results, forward_passes=passes)


def _expired(batch: PredictBatch | GenerateBatch) -> bool:
    return bool(batch.deadline) and time.time() > batch.deadline


def _too_late(worker: str, batch: PredictBatch) -> PredictionsReady:
    return PredictionsReady(worker, batch.batch, [], "DEADLINE_EXCEEDED", "every caller of the batch gave up")


def _decoded_size(decoded: Any) -> int:
    """Roughly what a decoded input holds in memory (an RGB image, a wave, a text)."""
    if hasattr(decoded, "size") and isinstance(decoded.size, tuple):
        width, height = decoded.size
        return int(width * height * 3)
    return int(getattr(decoded, "nbytes", len(str(decoded))))


def _decoded_chunks(
    model: LoadedModel, inputs: list[tuple[str, Any]], results: list[dict[str, Any]]
) -> Iterator[list[tuple[int, Any]]]:
    """The inputs decoded a forward pass's worth at a time (at most MAX_FORWARD_ROWS, and at most
    DECODED_BUDGET_BYTES unless one input alone is larger), so the decoded batch never sits in memory whole. A bad
    input fails alone: its error goes into results and its neighbours go on."""
    chunk: list[tuple[int, Any]] = []
    held = 0
    for index, item in enumerate(inputs):
        try:
            decoded = model.decode(item)
        except (InvalidDataset, ValueError, TypeError) as exc:
            results[index] = {"error": str(exc)}
            continue
        size = _decoded_size(decoded)
        if chunk and (len(chunk) >= MAX_FORWARD_ROWS or held + size > DECODED_BUDGET_BYTES):
            yield chunk
            chunk, held = [], 0
        chunk.append((index, decoded))
        held += size
    if chunk:
        yield chunk
