"""The last block computes only the position the head reads: the same logits and gradients as the whole block,
installed only where the first batch proves it, and gone again before the model is saved or exported."""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import make_tiny_wav2vec2
from tests.tiny import keyword_rows, make_tiny_bert, write_jsonl
from tuneforge.workers.core import first_position
from tuneforge.workers.core.first_position import first_position_block
from tuneforge.workers.messages import LogEmitted, Outcome, TrainingProgress

INSTALLED = "the last block computes only the first position"


def bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)  # fmt: skip
    ids = torch.randint(5, 90, (6, 12))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0  # padded examples: the first query must see the same keys as before
    return BertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask}


def vit() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    return ViTForImageClassification(config), {"pixel_values": torch.randn(6, 3, 16, 16)}


def gradients(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch, labels=torch.tensor([0, 1, 2, 0, 1, 2])).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [bert, vit])
def test_the_same_logits_and_gradients_as_the_whole_block(make) -> None:  # type: ignore[no-untyped-def]
    model, batch = make()
    block = first_position_block(model, batch)
    assert block is not None
    model.eval()  # no dropout: the two ways must agree exactly up to float rounding
    fast = gradients(model, batch)
    with torch.no_grad():
        fast_logits = model(**batch).logits
        short = model.base_model(**batch).last_hidden_state
    block.remove()
    whole = gradients(model, batch)
    with torch.no_grad():
        whole_logits = model(**batch).logits
        full = model.base_model(**batch).last_hidden_state
    assert short.shape[1] == 1 and full.shape[1] > 1  # the last block's other positions were never computed
    torch.testing.assert_close(fast_logits, whole_logits, rtol=1e-4, atol=1e-5)
    assert fast.keys() == whole.keys()
    for name, value in fast.items():
        torch.testing.assert_close(value, whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_not_installed_where_the_head_reads_every_position(tmp_path: Path) -> None:
    from transformers import AutoModelForAudioClassification

    wav2vec2 = AutoModelForAudioClassification.from_pretrained(make_tiny_wav2vec2(tmp_path / "w"))
    assert first_position_block(wav2vec2, {"input_values": torch.randn(2, 8000)}) is None
    model, batch = bert()
    model.bert.pooler = None  # a head that mean-pools would see different numbers: the check refuses

    class MeanPooled(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner
            self.base_model = inner.bert

        def forward(self, **batch: torch.Tensor):  # type: ignore[no-untyped-def]
            hidden = self.inner.bert(**batch).last_hidden_state
            return type("Out", (), {"logits": self.inner.classifier(hidden.mean(dim=1))})()

    assert first_position_block(MeanPooled(model), batch) is None
    assert all("forward" not in vars(m) for m in model.modules()), "a refused block is left whole"


def test_a_text_job_trains_with_it_and_saves_the_whole_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dropout the job's losses and weights match a run with the whole block; the artifact is whole."""
    model = make_tiny_bert(tmp_path / "bert", num_labels=3, dropout=0.0)
    data = write_jsonl(tmp_path / "train.jsonl", keyword_rows(64, seed=4))
    spec = make_spec(model, hyperparameters=dataclasses.replace(FAST, epochs=2))

    def trained(work: Path) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
        finished, events = run(spec, data, work)
        assert finished.outcome is Outcome.SUCCEEDED, finished.message
        with tarfile.open(work / "artifact.tar") as tar:
            tar.extract("model.safetensors", work / "unpacked", filter="data")
        log = [e.message for e in of_type(events, LogEmitted)]
        weights = load_file(work / "unpacked" / "model.safetensors")
        return [e.loss for e in of_type(events, TrainingProgress)], weights, log

    losses, weights, log = trained(tmp_path / "fast")
    assert any(INSTALLED in line for line in log), log
    monkeypatch.setattr(first_position, "BLOCKS", {})
    whole_losses, whole_weights, whole_log = trained(tmp_path / "whole")
    assert not any(INSTALLED in line for line in whole_log)
    assert losses == pytest.approx(whole_losses, rel=1e-4, abs=1e-5)
    for name, value in weights.items():
        if name.endswith("key.bias"):
            # a key bias shifts every score of a query alike, which softmax ignores: its gradient is float noise,
            # which Adam scales up to full steps, in both runs alike
            continue
        torch.testing.assert_close(value, whole_weights[name], rtol=1e-3, atol=1e-5, msg=name)
