"""One freeze-policy and head API for every modality: works on any transformers model with a `base_model`.

The backbone is `model.base_model` (what `base_model_prefix` names); its blocks are the longest ModuleList inside
it (`encoder.layer` for BERT, `encoder.layers` for wav2vec2, ...); the head is everything outside the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from workers.core.errors import JobFailure
from workers.spec import Activation, AdaptationMethod, AdaptationSettings, HeadSettings

ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.GELU: nn.GELU,
    Activation.TANH: nn.Tanh,
}


@dataclass(frozen=True)
class TrainableSummary:
    """How many parameters train, for the job log."""

    trainable: int
    total: int

    def describe(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return f"{self.trainable:,} of {self.total:,} parameters train ({share:.2f}%)"


def backbone_of(model: nn.Module) -> nn.Module:
    """The pretrained body of a transformers model (everything but the task head)."""
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise JobFailure("UNSUPPORTED_MODEL", f"{type(model).__name__} has no separate backbone to freeze")
    return backbone


def blocks_of(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's repeated blocks: its longest ModuleList."""
    lists = [module for module in backbone.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise JobFailure("UNSUPPORTED_MODEL", f"found no blocks in {type(backbone).__name__}")
    return max(lists, key=len)


def _freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def apply_adaptation(model: nn.Module, settings: AdaptationSettings) -> TrainableSummary:
    """Sets requires_grad according to the method; the head always trains."""
    match settings.method:
        case AdaptationMethod.FULL:
            pass
        case AdaptationMethod.FROZEN_BACKBONE:
            _freeze(backbone_of(model))
        case AdaptationMethod.FREEZE_FIRST_BLOCKS:
            _freeze_first_blocks(model, settings.num_frozen_blocks)
        case AdaptationMethod.LORA:
            raise JobFailure("UNIMPLEMENTED", "adaptation.method LORA is not available on this server yet")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainableSummary(trainable, total)


def _freeze_first_blocks(model: nn.Module, count: int) -> None:
    backbone = backbone_of(model)
    blocks = blocks_of(backbone)
    if count > len(blocks):
        raise JobFailure(
            "INVALID_SPEC",
            f"adaptation.num_frozen_blocks is {count} but {type(model).__name__} has only {len(blocks)} blocks",
        )
    embeddings = getattr(backbone, "embeddings", None)
    if isinstance(embeddings, nn.Module):
        _freeze(embeddings)
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    input_embeddings = get_input_embeddings() if callable(get_input_embeddings) else None
    if isinstance(input_embeddings, nn.Module):
        _freeze(input_embeddings)
    for block in list(blocks)[:count]:
        _freeze(block)


def build_head(in_features: int, num_labels: int, settings: HeadSettings) -> nn.Sequential:
    """Hidden layers (linear, activation, dropout) then a linear layer to the labels."""
    layers: list[nn.Module] = []
    width = in_features
    for hidden in settings.hidden_sizes:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[settings.activation](), nn.Dropout(settings.dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_labels))
    return nn.Sequential(*layers)


def classifier_path(model: nn.Module, num_labels: int) -> str:
    """Dotted name of the final linear layer mapping features to labels (outside the backbone)."""
    backbone_ids = {id(m) for m in backbone_of(model).modules()}
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == num_labels and id(module) not in backbone_ids
    ]
    if not candidates:
        raise JobFailure("UNSUPPORTED_MODEL", f"found no classification layer in {type(model).__name__}")
    return str(candidates[-1])


def replace_head(model: nn.Module, num_labels: int, settings: HeadSettings) -> str:
    """Replaces the final classification layer with a custom head; returns the replaced module's name."""
    path = classifier_path(model, num_labels)
    parent_name, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attribute)
    setattr(parent, attribute, build_head(old.in_features, num_labels, settings))
    return path
