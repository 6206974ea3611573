"""Warm workers: the base models the last jobs loaded stay in the worker's memory, within a byte budget (least
recently used first out), so the next job on the same model gets a copy instead of reading and building it again.

A warm start must train exactly as a cold one. Loading a classifier draws its new head from the global torch
generator, so an entry is keyed by the generator's state before the load as well as by the model and the loading
options, and a hit leaves the generator where the load left it. A job with another seed loads cold (and is kept).
Processors (tokenizers, image processors, feature extractors) are kept too and shared: the core only reads them.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MAX_ENTRIES = 32
"""Processors weigh next to nothing against the budget; this bounds how many are kept."""
PROCESSOR_WORDS = ("Tokenizer", "Processor", "FeatureExtractor")
"""Loaders whose results draw nothing at random (any other loader is keyed by the generator's state too)."""


@dataclass
class _Entry:
    value: Any
    rng_after: torch.Tensor | None
    nbytes: int


def model_bytes(model: nn.Module) -> int:
    """Memory held by a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.element_size() * t.nelement() for t in tensors)


def source_fingerprint(base_model: str) -> tuple[int, int]:
    """A local model folder's (or file's) newest modification time and total size (a changed one is loaded again);
    (0, 0) for hub ids, which the hub's own cache resolves."""
    folder = Path(base_model)
    if folder.is_file():  # a GGUF file
        stat = folder.stat()
        return (stat.st_mtime_ns, stat.st_size)
    if not folder.is_dir():
        return (0, 0)
    files = [f.stat() for f in folder.iterdir() if f.is_file()]
    return (max((s.st_mtime_ns for s in files), default=0), sum(s.st_size for s in files))


class ModelCache:
    """The worker's kept models and processors. Budget 0 keeps nothing."""

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self.hits = 0
        self.model_hits = 0
        """Hits on models (not processors): what makes a start warm."""
        self.misses = 0
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, loader: Any, base_model: str, load: Callable[[], Any], **options: Any) -> Any:
        """The loaded object: a fresh copy of a kept model, the kept processor, or `load()`'s result (then kept)."""
        if self.budget_bytes <= 0:
            return load()
        name = getattr(loader, "__name__", repr(loader))
        draws_random = not any(word in name for word in PROCESSOR_WORDS)
        key = (
            name,
            base_model,
            source_fingerprint(base_model),
            repr(sorted(options.items())),
            hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest() if draws_random else "",
        )
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                if entry.rng_after is None:
                    return entry.value
                self.model_hits += 1
                torch.set_rng_state(entry.rng_after)
                return copy.deepcopy(entry.value)
            self.misses += 1
        value = load()
        if isinstance(value, nn.Module):
            self._keep(key, _Entry(copy.deepcopy(value), torch.get_rng_state(), model_bytes(value)))
        else:
            self._keep(key, _Entry(value, None, 0))
        return value

    def _keep(self, key: tuple[Any, ...], entry: _Entry) -> None:
        if entry.nbytes > self.budget_bytes:
            return
        with self._lock:
            self._entries[key] = entry
            while self.kept_bytes > self.budget_bytes or len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)


CACHE = ModelCache()
"""This process's cache; a worker process sizes it at start (`configure`), elsewhere it keeps nothing."""


def configure(budget_bytes: int) -> None:
    CACHE.budget_bytes = budget_bytes
