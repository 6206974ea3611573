"""Predicting from a checkpoint: the model rebuilt from `serving/` and a checkpoint's weights (custom head, LoRA
adapters merged) answers as the finished model does when the two hold the same weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.core.test_training_core import FAST, make_spec, run
from tests.tiny import keyword_rows
from tuneforge.workers.core.prediction import ModelCache, load_model
from tuneforge.workers.messages import Outcome
from tuneforge.workers.spec import (
    Activation,
    AdaptationMethod,
    AdaptationSettings,
    DataSettings,
    HeadSettings,
    LoraSettings,
)

VARIANTS = {
    "lora": {"adaptation": AdaptationSettings(method=AdaptationMethod.LORA, lora=LoraSettings())},
    "custom head": {"head": HeadSettings(hidden_sizes=(16,), activation=Activation.GELU, dropout=0.0)},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_latest_checkpoint_answers_as_the_finished_model(
    variant: str, tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=2), **VARIANTS[variant])
    spec = dataclasses.replace(spec, data=DataSettings(training_file="files/train"))  # no validation: no "best"
    finished, _ = run(spec, keyword_dataset, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    import tarfile

    with tarfile.open(tmp_path / "work" / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    finished_model = load_model(tmp_path / "model")
    from_checkpoint = ModelCache(2, tmp_path / "cache", {}).get_checkpoint(
        str(tmp_path / "work" / "checkpoints"), "latest"
    )
    items = [("text", row["text"]) for row in keyword_rows(8, seed=5)]
    with torch.inference_mode():
        expected = finished_model.model(**finished_model.inputs(items)).logits
        produced = from_checkpoint.model(**from_checkpoint.inputs(items)).logits
    assert from_checkpoint.labels == finished_model.labels
    assert torch.allclose(expected, produced, atol=1e-4), (expected - produced).abs().max()
