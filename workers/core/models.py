"""Loading pretrained models and processors safely: safetensors only, never remote code."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.core.model_cache import CACHE

GGUF_SUFFIX = ".gguf"


def load_pretrained(loader: Any, base_model: str, **kwargs: Any) -> Any:
    """Calls `loader.from_pretrained` with the safe options (or takes it from the worker's kept models); any failure
    becomes MODEL_LOAD_FAILED."""
    if not os.path.isabs(base_model) and os.path.lexists(base_model):
        raise JobFailure(
            "UNSAFE_MODEL",
            f"base model {base_model!r} names a folder relative to the worker's working directory, which is never "
            "loaded; give a local model as an absolute path under a model root",
        )
    try:
        if base_model.lower().endswith(GGUF_SUFFIX):
            load = _gguf_load(loader, base_model, kwargs)
        else:
            load = lambda: loader.from_pretrained(base_model, trust_remote_code=False, **kwargs)  # noqa: E731
        return CACHE.load(loader, base_model, load, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise JobFailure(
                "UNSAFE_MODEL", f"base model {base_model!r} needs remote code, which Tuneforge never runs"
            ) from exc
        if "safetensors" in str(exc).lower() and kwargs.get("use_safetensors"):
            raise JobFailure(
                "UNSAFE_MODEL",
                f"base model {base_model!r} has no safetensors weights; pickled weights (.bin) can run code when "
                "loaded, so only safetensors are",
            ) from exc
        raise JobFailure(
            "MODEL_LOAD_FAILED",
            f"could not load base model {base_model!r}: {first_line}. Give a hub id the server can reach, or a "
            "model folder (with safetensors weights) or a GGUF file of a causal language model under a configured "
            "model root",
        ) from exc


def _gguf_load(loader: Any, path: str, kwargs: dict[str, Any]) -> Callable[[], Any]:
    """Loads a tokenizer or model from a GGUF file (llama.cpp's format: tensors and metadata, no code) with
    transformers' GGUF support, which dequantises the weights."""
    folder, name = os.path.split(path)
    options = {key: value for key, value in kwargs.items() if key != "use_safetensors"}

    def load() -> Any:
        loaded = loader.from_pretrained(folder, gguf_file=name, trust_remote_code=False, **options)
        return plain_model(loaded) if isinstance(loaded, nn.Module) else loaded

    return load


def plain_model(model: Any) -> Any:
    """The same weights in a plain model of the same class: transformers marks a model loaded from GGUF as
    quantised (though its weights are dequantised) and refuses to save it, and the artifact is a normal folder."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain.to(model.dtype)


def load_classifier(loader: Any, base_model: str, labels: list[str]) -> Any:
    """A classification model with a fresh head for these labels (the base model's own head is replaced when its
    size differs), its label names saved in the config."""
    return load_pretrained(
        loader,
        base_model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        use_safetensors=True,
        ignore_mismatched_sizes=True,
    )


DEFAULT_MAX_LENGTH = 512


def sequence_limit(requested: int, tokenizer: Any, model: Any) -> int:
    """Tokens a text is cut to: the requested length, never more than the tokenizer or the model's positions take
    (training and Predict alike, so a long input is truncated, not an index error)."""
    limit = min(
        int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH),
        int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH),
        DEFAULT_MAX_LENGTH,
    )
    return min(requested, limit) if requested > 0 else limit
