"""Predictions from a checkpoint of an unfinished job. A checkpoint holds only the training weights, so beside the
job's checkpoints the trainer keeps `serving/`: the model's config (labels, custom head), its processor and the
resolved spec, written once. With them a worker rebuilds the model as training set it up (custom head, LoRA
adapters, merged for serving) and loads a checkpoint's weights into it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_model
from torch import nn

from tuneforge.workers.core.artifact import HEAD_CONFIG_KEY, spec_to_json
from tuneforge.workers.spec import Activation, HeadSettings, LoraSettings, TrainingSpec
from tuneforge.workers.tasks import registry
from tuneforge.workers.tasks.runtime import auto_class, model_class_of

SERVING = "serving"
SPEC_FILE = "job_spec.json"


def save_serving_skeleton(checkpoint_dir: Path, model: nn.Module, processor: Any, spec: TrainingSpec) -> None:
    """Writes `serving/` once per job (atomically): what rebuilding the model needs, without weights."""
    folder = checkpoint_dir / SERVING
    if (folder / SPEC_FILE).exists():
        return
    temporary = checkpoint_dir / f".{SERVING}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        config: Any = getattr(model, "config")  # noqa: B009 - PeftModel and PreTrainedModel both expose it
        if spec.head is not None:
            setattr(config, HEAD_CONFIG_KEY, dataclasses.asdict(spec.head))
        config.save_pretrained(str(temporary))
        processor.save_pretrained(str(temporary))
        (temporary / SPEC_FILE).write_text(json.dumps(spec_to_json(spec), sort_keys=True))
        shutil.rmtree(folder, ignore_errors=True)
        temporary.rename(folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def rebuild(serving: Path, weights: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The model with a checkpoint's weights (LoRA merged), its processor and the resolved spec."""
    from transformers import AutoConfig

    from tuneforge.workers.core.adaptation import replace_head
    from tuneforge.workers.core.lora import apply_lora

    spec = json.loads((serving / SPEC_FILE).read_text())
    runtime = registry.runtime(spec["task"])
    config = AutoConfig.from_pretrained(str(serving), trust_remote_code=False)
    model: Any = model_class_of(runtime, config).from_config(config)
    processor_class = auto_class(runtime.processor_class)
    head = getattr(config, HEAD_CONFIG_KEY, None)
    if head:
        settings = HeadSettings(tuple(head["hidden_sizes"]), Activation(head["activation"]), head["dropout"])
        replace_head(model, config.num_labels, settings)
    lora = spec["adaptation"].get("lora")
    if spec["adaptation"]["method"] == "lora" and lora:
        settings_lora = LoraSettings(lora["rank"], lora["alpha"], lora["dropout"], tuple(lora["target_modules"]))
        wrapped = apply_lora(model, settings_lora)
        load_model(wrapped, str(weights))
        model = wrapped.merge_and_unload()
    else:
        load_model(model, str(weights))
    model.eval()
    processor = processor_class.from_pretrained(str(serving))
    return model, processor, spec
