"""The CPU dropout keeps each value with probability 1 - p and scales it by 1 / (1 - p), like nn.Dropout; it is
seeded by torch's generator, passes gradients through the kept values only, and does nothing in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from tuneforge.workers.core.cpu_dropout import UniformMaskDropout, use_cpu_dropout


def dropout(p: float) -> nn.Dropout:
    module = nn.Dropout(p)
    use_cpu_dropout(module)
    assert type(module) is UniformMaskDropout
    return module


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_it_keeps_one_minus_p_and_scales_what_it_keeps(p: float) -> None:
    torch.manual_seed(0)
    out = dropout(p)(torch.ones(400_000))
    kept = out[out != 0]
    assert kept.numel() / out.numel() == pytest.approx(1 - p, abs=0.005)
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)  # unbiased, as nn.Dropout


def test_gradients_flow_through_kept_values_only_and_the_seed_decides_the_mask() -> None:
    module = dropout(0.3)
    torch.manual_seed(1)
    x = torch.randn(5000, requires_grad=True)
    out = module(x)
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad != 0, out != 0)
    assert torch.allclose(x.grad[x.grad != 0], torch.full_like(x.grad[x.grad != 0], 1 / 0.7))
    torch.manual_seed(2)
    first = module(torch.ones(1000))
    torch.manual_seed(2)
    assert torch.equal(module(torch.ones(1000)), first)


def test_eval_mode_and_the_edge_probabilities() -> None:
    x = torch.randn(100)
    assert dropout(0.5).eval()(x) is x
    assert dropout(0.0)(x) is x
    assert torch.equal(dropout(1.0)(x), torch.zeros(100))
    half = dropout(0.2)(torch.ones(10_000, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and (half != 0).float().mean().item() == pytest.approx(0.8, abs=0.02)


def test_every_plain_dropout_of_a_model_is_swapped() -> None:
    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    )
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    assert use_cpu_dropout(model) == plain > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
