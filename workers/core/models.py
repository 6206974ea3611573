"""Loading pretrained models and processors safely: safetensors only, never remote code."""

from __future__ import annotations

from typing import Any

from workers.core.errors import JobFailure


def load_pretrained(loader: Any, base_model: str, **kwargs: Any) -> Any:
    """Calls `loader.from_pretrained` with the safe options; any failure becomes MODEL_LOAD_FAILED."""
    try:
        return loader.from_pretrained(base_model, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobFailure(
            "MODEL_LOAD_FAILED",
            f"could not load base model {base_model!r}: {first_line}. Give a hub id the server can reach or a "
            "model folder (with safetensors weights) under a configured model root",
        ) from exc
