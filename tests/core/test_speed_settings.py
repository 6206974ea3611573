"""Speed settings that must not change what is learned: channels-last for convolutional nets on CUDA, and the
optional torch.compile."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tuneforge.workers.core.device import to_channels_last, wants_channels_last
from tuneforge.workers.messages import Outcome, TrainingProgress


def test_channels_last_is_for_convolutional_nets_on_cuda_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).eval()
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32))  # fmt: skip
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert wants_channels_last(resnet, cuda)
    assert not wants_channels_last(resnet, cpu) and not wants_channels_last(vit, cuda)  # one conv: a patch embedding
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])}
    converted = to_channels_last(batch)
    assert converted["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert converted["labels"] is batch["labels"]
    with torch.no_grad():
        expected = resnet(pixel_values=batch["pixel_values"]).logits
        resnet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        torch.testing.assert_close(resnet(pixel_values=converted["pixel_values"]).logits, expected)


@pytest.mark.slow
def test_a_compiled_model_learns_as_the_eager_one(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    """Slow (tens of seconds of compiling on a CPU): `make test-all` runs it."""
    hyperparameters = dataclasses.replace(FAST, epochs=1, max_steps=6)
    losses = []
    for compiled in (False, True):
        spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(hyperparameters, compile=compiled))
        finished, events = run(spec, keyword_dataset, tmp_path / str(compiled))
        assert finished.outcome is Outcome.SUCCEEDED, finished.message
        losses.append([e.loss for e in of_type(events, TrainingProgress)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
