"""Each optimisation option shows its effect where it is built: the optimizer's groups carry the head rate, the
layer-wise decayed rates and the no-decay parameters; SGD carries Nesterov momentum; BF16 autocasts in bf16 on the
CPU; label smoothing and class weights change the loss by the documented amounts. (Training with them end to end is
tests/core/test_toolbox.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tuneforge.workers.core.adaptation import plan_parameters
from tuneforge.workers.core.device import autocast_dtype
from tuneforge.workers.core.optimization import build_optimizer, classification_loss
from tuneforge.workers.spec import ClassBalance, Hyperparameters, OptimizerKind, Precision

CPU = torch.device("cpu")


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def rate_and_decay_by_name(model: torch.nn.Module, hp: Hyperparameters) -> dict[str, tuple[float, float]]:
    optimizer = build_optimizer(plan_parameters(model, hp.layer_decay != 1.0, None), hp, CPU)
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_head_rate_layer_decay_and_no_decay_groups() -> None:
    model = bert()
    hp = Hyperparameters(learning_rate=1e-3, head_learning_rate=5e-3, layer_decay=0.5, weight_decay=0.1)
    groups = rate_and_decay_by_name(model, hp)
    assert groups.keys() == {name for name, _ in model.named_parameters()}
    assert groups["classifier.weight"] == (5e-3, 0.1) and groups["classifier.bias"] == (5e-3, 0.0)
    top, below = groups["bert.encoder.layer.2.output.dense.weight"], groups["bert.encoder.layer.1.output.dense.weight"]
    assert below[0] == pytest.approx(top[0] * 0.5), "one block lower, one more factor of the decay"
    assert groups["bert.embeddings.word_embeddings.weight"][0] < groups["bert.encoder.layer.0.output.dense.weight"][0]
    assert groups["bert.encoder.layer.0.attention.output.LayerNorm.weight"][1] == 0.0
    assert groups["bert.encoder.layer.0.attention.self.query.weight"][1] == 0.1


def test_without_decay_options_every_backbone_parameter_has_the_base_rate() -> None:
    model = bert()
    groups = rate_and_decay_by_name(model, Hyperparameters(learning_rate=1e-3))
    assert {rate for name, (rate, _) in groups.items()} == {1e-3}


def test_sgd_carries_nesterov_momentum_and_adamw_is_fused() -> None:
    model = bert()
    parameters = plan_parameters(model, False, None)
    sgd = build_optimizer(parameters, Hyperparameters(optimizer=OptimizerKind.SGD, momentum=0.8, nesterov=True), CPU)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(parameters, Hyperparameters(), CPU)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]


def test_precision_chooses_the_autocast_dtype() -> None:
    assert autocast_dtype(Precision.BF16, CPU) is torch.bfloat16
    assert autocast_dtype(Precision.AUTO, CPU) is None and autocast_dtype(Precision.FP32, CPU) is None
    assert autocast_dtype(Precision.AUTO, torch.device("cuda")) is torch.bfloat16


def test_label_smoothing_and_class_weights_change_the_loss_as_documented() -> None:
    labels = [0] * 90 + [1] * 10
    confident = torch.tensor([[20.0, -20.0], [-20.0, 20.0]])  # right about both rows, certain of it
    targets = torch.tensor([0, 1])
    plain = classification_loss(Hyperparameters(), labels, 2, CPU)(confident, targets)
    smoothed = classification_loss(Hyperparameters(label_smoothing=0.2), labels, 2, CPU)(confident, targets)
    assert float(plain) < 1e-6
    assert float(smoothed) == pytest.approx(0.1 * 40, rel=1e-3), "smoothing 0.2 over 2 classes: 10% aimed at the other"

    wrong = torch.tensor([[2.0, -2.0], [2.0, -2.0]])  # says class 0 for a common and a rare row
    per_row = torch.nn.functional.cross_entropy(wrong, targets, reduction="none")
    weighted = classification_loss(Hyperparameters(class_balance=ClassBalance.WEIGHTED_LOSS), labels, 2, CPU)
    w_common, w_rare = 100 / 180, 100 / 20  # inverse frequency, normalised
    expected = (w_common * per_row[0] + w_rare * per_row[1]) / (w_common + w_rare)
    assert float(weighted(wrong, targets)) == pytest.approx(float(expected), rel=1e-6)
    assert float(weighted(wrong, targets)) > float(per_row.mean()), "missing the rare class costs more"
