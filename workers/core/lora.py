"""LoRA through peft: adapters on the backbone, the head trained in full, saved both merged and as an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.workers.core.adaptation import backbone_of, blocks_of
from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.spec import LoraSettings

ADAPTER_FOLDER = "adapter"


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the backbone that hold parameters of their own (`classifier`, `projector`, ...);
    a language model's output layer tied to its input embeddings holds none, and stays shared."""
    backbone = backbone_of(model)
    shared = {id(parameter) for parameter in backbone.parameters()}
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and any(id(parameter) not in shared for parameter in child.parameters())
    ]


# Attention projections to adapt, by naming family, tried in order (the LoRA paper adapts queries and values).
ATTENTION_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("qkv",), ("c_attn",))


def default_target_modules(model: nn.Module) -> list[str]:
    """Queries and values for transformers; the block convolutions for convolutional nets."""
    backbone = backbone_of(model)
    linear = {
        name.rsplit(".", 1)[-1]
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # transformers' Conv1D: GPT-2's projections
    }
    for names in ATTENTION_TARGETS:
        if set(names) <= linear:
            return list(names)
    convolutions = {
        name.rsplit(".", 1)[-1]
        for name, m in blocks_of(backbone).named_modules()
        if isinstance(m, nn.Conv2d | nn.Conv1d) and m.groups == 1
    }
    if convolutions:
        return sorted(convolutions)
    raise JobFailure(
        "INVALID_SPEC",
        f"no default LoRA targets for {type(model).__name__}; set adaptation.lora.target_modules",
    )


def apply_lora(model: nn.Module, settings: LoraSettings) -> Any:
    """Wraps the model with LoRA adapters; only the adapters and the head train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft reads any number
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) or default_target_modules(model),
        modules_to_save=head_module_names(model),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise JobFailure(
            "INVALID_SPEC",
            f"LoRA cannot adapt {model_type}: {exc}. Set adaptation.lora.target_modules to the names of its "
            "attention or projection layers",
        ) from exc


def is_lora(model: nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None


def save_lora(model: Any, folder: Path) -> nn.Module:
    """Saves the adapter (with the head) under `adapter/`, then returns the merged plain model to save as usual."""
    model.save_pretrained(str(folder / ADAPTER_FOLDER))
    merged: nn.Module = model.merge_and_unload()
    return merged
