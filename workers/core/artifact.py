"""The job's artifact: a `save_pretrained` model folder plus metrics and the resolved spec, packed as a tar archive.

A model whose head was replaced by a custom MLP records the head in its config (`tuneforge_head`); load such a
model with `load_artifact_model`, which rebuilds the head before loading the weights. A model with its own head
loads with plain `transformers`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.workers.core.adaptation import replace_head
from tuneforge.workers.core.lora import is_lora, save_lora
from tuneforge.workers.spec import Activation, HeadSettings, TrainingSpec

HEAD_CONFIG_KEY = "tuneforge_head"


def spec_to_json(spec: TrainingSpec) -> dict[str, Any]:
    """The resolved spec as plain JSON (enums as their values)."""
    plain: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(spec), default=str))
    return plain


def save_model_folder(
    model: nn.Module, processor: Any, folder: Path, spec: TrainingSpec, metrics: dict[str, Any]
) -> None:
    """Writes the Hugging Face folder with metrics.json and job_spec.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    if spec.head is not None:
        config: Any = getattr(model, "config")  # noqa: B009 - nn.Module has no typed `config`
        setattr(config, HEAD_CONFIG_KEY, dataclasses.asdict(spec.head))
    model.save_pretrained(str(folder))  # type: ignore[operator]
    processor.save_pretrained(str(folder))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (folder / "job_spec.json").write_text(json.dumps(spec_to_json(spec), indent=2, sort_keys=True))


def pack_archive(folder: Path, archive: Path) -> tuple[int, str]:
    """Tars the folder to `archive` atomically (temp file, fsync, rename); returns its size and SHA-256."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    temporary = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(temporary, "w") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    with open(temporary, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
        os.fsync(handle.fileno())
    os.replace(temporary, archive)
    directory = os.open(archive.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return archive.stat().st_size, digest.hexdigest()


def write_artifact(
    model: nn.Module,
    processor: Any,
    spec: TrainingSpec,
    metrics: dict[str, Any],
    work_dir: Path,
    archive: Path,
    finish: Callable[[Path], None] = lambda folder: None,
) -> tuple[int, str]:
    """Saves the model folder under work_dir and packs it into the archive. A LoRA model is saved twice: its
    adapter (with the head) under `adapter/`, and merged into the base weights as the main folder. `finish` adds
    the last files (report, manifest) to the folder before it is packed."""
    folder = work_dir / "artifact"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if is_lora(model):
        model = save_lora(model, folder)
    save_model_folder(model, processor, folder, spec, metrics)
    finish(folder)
    return pack_archive(folder, archive)


def load_artifact_model(folder: str | Path, model_class: Any) -> nn.Module:
    """Loads an artifact's model with its task's auto class; a custom head (any classifier may have one) is rebuilt
    after loading and gets its weights from the file. The backbone goes through `from_pretrained`, which maps
    checkpoint names across transformers versions (ViT's `encoder.layer` -> `layers` ...); a plain state-dict load
    would not."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    head = getattr(config, HEAD_CONFIG_KEY, None)
    model: nn.Module = model_class.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False)
    if head:
        settings = HeadSettings(
            hidden_sizes=tuple(head["hidden_sizes"]), activation=Activation(head["activation"]), dropout=head["dropout"]
        )
        path = replace_head(model, config.num_labels, settings)
        prefix = f"{path}."
        weights = load_file(str(Path(folder) / "model.safetensors"))
        head_weights = {name[len(prefix) :]: value for name, value in weights.items() if name.startswith(prefix)}
        model.get_submodule(path).load_state_dict(head_weights)
    model.eval()
    return model
