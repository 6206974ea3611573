"""Warm workers: a job on a model the worker still holds trains exactly as a cold start, the kept copy is never
the one trained, and the memory budget, the seed and a changed model folder are respected."""

from __future__ import annotations

import dataclasses
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.tiny import make_tiny_bert
from tuneforge.workers.core import model_cache
from tuneforge.workers.core.model_cache import CACHE, ModelCache, model_bytes
from tuneforge.workers.messages import LogEmitted, Outcome, TrainingProgress
from tuneforge.workers.spec import TrainingSpec

WARM = "warm start"


@pytest.fixture
def warm_cache() -> Iterator[ModelCache]:
    """This process's cache with room for the tiny models, emptied afterwards."""
    model_cache.configure(64 * 2**20)
    try:
        yield CACHE
    finally:
        model_cache.configure(0)
        CACHE._entries.clear()


def train(spec: TrainingSpec, data: Path, work: Path) -> tuple[list[float], dict[str, torch.Tensor], bool]:
    finished, events = run(spec, data, work)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    with tarfile.open(work / "artifact.tar") as tar:
        tar.extract("model.safetensors", work / "unpacked", filter="data")
    warm = any(WARM in e.message for e in of_type(events, LogEmitted))
    return [e.loss for e in of_type(events, TrainingProgress)], load_file(work / "unpacked" / "model.safetensors"), warm


def test_a_warm_start_trains_exactly_as_a_cold_one(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, warm_cache: ModelCache
) -> None:
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=2, seed=5))
    cold = train(spec, keyword_dataset, tmp_path / "cold")
    warm = train(spec, keyword_dataset, tmp_path / "warm")
    again = train(spec, keyword_dataset, tmp_path / "again")  # the kept copy was not the one trained
    assert (cold[2], warm[2], again[2]) == (False, True, True)
    assert warm_cache.hits >= 2 and len(warm_cache) == 2  # the model and its tokenizer
    for other in (warm, again):
        assert other[0] == cold[0]
        assert all(torch.equal(cold[1][name], other[1][name]) for name in cold[1])
    other_seed = dataclasses.replace(spec, hyperparameters=dataclasses.replace(FAST, epochs=2, seed=6))
    assert not train(other_seed, keyword_dataset, tmp_path / "seed6")[2], "another seed draws another head"


def test_the_budget_keeps_the_most_recent_models(tmp_path: Path) -> None:
    folders = [make_tiny_bert(tmp_path / f"bert-{i}", seed=i) for i in range(3)]

    def load(folder: Path, cache: ModelCache) -> torch.nn.Module:
        torch.manual_seed(0)
        loader = AutoModelForSequenceClassification
        model: torch.nn.Module = cache.load(loader, str(folder), lambda: loader.from_pretrained(folder))
        return model

    size = model_bytes(load(folders[0], ModelCache()))
    cache = ModelCache(budget_bytes=int(size * 2.5))
    for folder in folders:
        load(folder, cache)
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 2)  # the oldest went out
    first = load(folders[0], cache)  # loaded again, and now the newest
    assert (cache.misses, len(cache)) == (4, 2)
    kept = load(folders[0], cache)
    assert cache.hits == 1 and kept is not first
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), kept.state_dict().values(), strict=True))
    (folders[0] / "config.json").write_text((folders[0] / "config.json").read_text() + "\n")
    load(folders[0], cache)
    assert cache.misses == 5, "a changed model folder is read again"
    assert ModelCache(budget_bytes=size // 2).load(
        AutoTokenizer, str(folders[0]), lambda: AutoTokenizer.from_pretrained(folders[0])
    ), "a budget smaller than the model keeps nothing, but loading works"
    tiny = ModelCache(budget_bytes=size // 2)
    load(folders[1], tiny)
    assert len(tiny) == 0
