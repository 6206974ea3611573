"""Lineage: what an artifact was made from, written into it as `manifest.json`.

The manifest names every file of the artifact with its SHA-256, the training and validation files' digests, the
full resolved spec with the automatic choices and their reasons, the base model's identity and digest, and the
versions of Python, the packages that shaped the weights, and Tuneforge. Anyone holding the artifact can check it
(`tuneforge verify`) and say how to make it again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tuneforge.workers.core.artifact import spec_to_json
from tuneforge.workers.core.auto_tuning import Choice
from tuneforge.workers.messages import DataFile
from tuneforge.workers.spec import TrainingSpec

MANIFEST = "manifest.json"
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "tokenizers",
    "numpy",
    "torchaudio",
    "torchvision",
    "pillow",
    "soundfile",
    "onnx",
    "onnxruntime",
)


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_digest(folder: Path) -> tuple[str, dict[str, str]]:
    """One digest for a folder (over each file's relative path and digest, sorted) and the per-file digests."""
    files = {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    combined = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in files.items()).encode())
    return combined.hexdigest(), files


def base_model_identity(base_model: str) -> dict[str, Any]:
    """A local folder's digest, or a hub model's revision (the cached snapshot's commit) and digest."""
    folder = Path(base_model)
    if folder.is_dir():
        digest, files = folder_digest(folder)
        return {"source": "local", "path": str(folder.resolve()), "sha256": digest, "files": len(files)}
    identity: dict[str, Any] = {"source": "hub", "id": base_model}
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(base_model, local_files_only=True))
        digest, files = folder_digest(snapshot)
        identity.update(revision=snapshot.name, sha256=digest, files=len(files))
    except Exception as exc:  # not in the local cache as a snapshot: the id is what is known
        identity["sha256_unavailable"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return identity


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in (*PACKAGES, "tuneforge"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def data_identity(data: DataFile | None) -> dict[str, Any] | None:
    if data is None:
        return None
    path = Path(data.path)
    return {"filename": data.filename, "sha256": file_digest(path), "size_bytes": path.stat().st_size}


def write_manifest(
    folder: Path,
    spec: TrainingSpec,
    choices: list[Choice],
    training: DataFile,
    validation: DataFile | None,
    job: str,
    attempt: int,
) -> dict[str, Any]:
    """Writes manifest.json into the artifact folder (every other file must already be there); returns it."""
    _, files = folder_digest(folder)
    files.pop(MANIFEST, None)
    manifest = {
        "format": 1,
        "job": f"jobs/{job}",
        "attempt": attempt,
        "files": files,
        "training_file": data_identity(training),
        "validation_file": data_identity(validation),
        "spec": spec_to_json(spec),
        "automatic_choices": [asdict(choice) for choice in choices],
        "base_model": base_model_identity(spec.base_model),
        "versions": versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
