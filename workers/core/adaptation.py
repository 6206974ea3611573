"""One freeze-policy, head and learning-rate-layout API for every modality, on any transformers model.

The backbone is `model.base_model` (what `base_model_prefix` names). Its blocks are found per architecture family
(`encoder.layer` for BERT and ViT, `encoder.layers` for wav2vec2, `encoder.stages` for ResNet and ConvNeXt, ...).
Backbone parameters registered before the first block form the stem (embeddings, patch or feature encoders); those
after the last block form the top (pooler, final norm). The head is everything outside the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.spec import Activation, AdaptationMethod, AdaptationSettings, HeadSettings

ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.GELU: nn.GELU,
    Activation.TANH: nn.Tanh,
}
# Where each architecture family keeps its repeated blocks, most specific first.
BLOCK_PATHS = (
    "encoder.layer",
    "encoder.layers",
    "encoder.stages",
    "encoder.blocks",
    "encoder.block",
    "layers",
    "stages",
    "blocks",
    "layer",
    "h",
)
# Task models whose `base_model` is themselves keep their backbone under one of these names (Whisper's classifier).
BACKBONE_ATTRIBUTES = ("encoder",)


@dataclass(frozen=True)
class TrainableSummary:
    """How many parameters train, for the job log."""

    trainable: int
    total: int

    def describe(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return f"{self.trainable:,} of {self.total:,} parameters train ({share:.2f}%)"


@dataclass
class ModelLayout:
    """The model's parameters by role: stem, each block (bottom first), top of the backbone, and head."""

    stem: list[nn.Parameter] = field(default_factory=list)
    blocks: list[list[nn.Parameter]] = field(default_factory=list)
    top: list[nn.Parameter] = field(default_factory=list)
    head: list[nn.Parameter] = field(default_factory=list)

    def depth_of(self) -> dict[int, int]:
        """Layer-wise decay exponent per parameter id: head 0, top and top block 1, ..., stem len(blocks)+1."""
        depth = {id(p): 0 for p in self.head}
        depth.update({id(p): 1 for p in self.top})
        for index, block in enumerate(self.blocks):
            depth.update({id(p): len(self.blocks) - index for p in block})
        depth.update({id(p): len(self.blocks) + 1 for p in self.stem})
        return depth


def backbone_of(model: nn.Module) -> nn.Module:
    """The pretrained body of a transformers model (everything but the task head)."""
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        return backbone
    for name in BACKBONE_ATTRIBUTES:
        candidate = getattr(model, name, None)
        if isinstance(candidate, nn.Module):
            return candidate
    raise JobFailure("UNSUPPORTED_MODEL", f"{type(model).__name__} has no separate backbone to freeze")


def frozen_backbone(model: nn.Module, unfreezer: GradualUnfreezer | None) -> nn.Module | None:
    """The backbone when none of it trains, now or later (FROZEN_BACKBONE); None otherwise."""
    if unfreezer is not None or getattr(model, "peft_config", None) is not None:
        return None
    try:
        backbone = backbone_of(model)
    except JobFailure:
        return None
    parameters = list(backbone.parameters())
    return backbone if parameters and not any(p.requires_grad for p in parameters) else None


def blocks_of(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's repeated blocks, looked up by the architecture family's attribute path."""
    for path in BLOCK_PATHS:
        try:
            found = backbone.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise JobFailure(
        "UNSUPPORTED_MODEL",
        f"cannot find the blocks of {type(backbone).__name__} (looked for {', '.join(BLOCK_PATHS)}); use adaptation "
        "FULL, FROZEN_BACKBONE or LORA with this architecture",
    )


def layout_of(model: nn.Module) -> ModelLayout:
    """Partitions every parameter by role (see the module docstring)."""
    backbone = backbone_of(model)
    blocks = blocks_of(backbone)
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    layout = ModelLayout(blocks=[[] for _ in blocks])
    seen_block = False
    for parameter in backbone.parameters():
        index = block_of.get(id(parameter))
        if index is not None:
            layout.blocks[index].append(parameter)
            seen_block = True
        else:
            (layout.top if seen_block else layout.stem).append(parameter)
    backbone_ids = {id(p) for p in backbone.parameters()}
    layout.head = [p for p in model.parameters() if id(p) not in backbone_ids]
    return layout


def _set_trainable(parameters: list[nn.Parameter], trainable: bool) -> None:
    for parameter in parameters:
        parameter.requires_grad_(trainable)


def apply_adaptation(model: nn.Module, settings: AdaptationSettings) -> TrainableSummary:
    """Sets requires_grad according to the method; the head always trains. (LoRA is applied by `lora.py`.)"""
    match settings.method:
        case AdaptationMethod.FULL:
            keep_feature_encoder_frozen(model)
        case AdaptationMethod.LORA:
            pass
        case AdaptationMethod.FROZEN_BACKBONE:
            _set_trainable(list(frozen_part(model).parameters()), False)
        case AdaptationMethod.FREEZE_FIRST_BLOCKS:
            _freeze_bottom(model, settings.num_frozen_blocks, "adaptation.num_frozen_blocks")
        case AdaptationMethod.LAST_BLOCKS_TRAINABLE:
            count = len(layout_of(model).blocks)
            _check_count(model, settings.num_trainable_blocks, count, "adaptation.num_trainable_blocks")
            _freeze_bottom(model, count - settings.num_trainable_blocks, "adaptation.num_trainable_blocks")
        case AdaptationMethod.GRADUAL_UNFREEZING:
            _set_trainable(list(backbone_of(model).parameters()), False)
    return summarize(model)


def frozen_part(model: nn.Module) -> nn.Module:
    """What FROZEN_BACKBONE freezes: the backbone, or for an encoder-decoder (Whisper) its encoder alone, since the
    decoder writes the task's output as a classifier's head does (and is tied to the output layer)."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
        encoder = get_encoder()
        if isinstance(encoder, nn.Module):
            return encoder
    return backbone_of(model)


def keep_feature_encoder_frozen(model: nn.Module) -> None:
    """wav2vec2-style speech models keep their convolutional feature encoder frozen in full fine-tuning, as their
    authors and transformers' own examples do: it learned from raw audio at a scale fine-tuning data does not
    reach, and frozen it needs no backward pass (the costliest part of a step on raw audio)."""
    freeze = getattr(model, "freeze_feature_encoder", None)
    if callable(freeze):
        freeze()


def summarize(model: nn.Module) -> TrainableSummary:
    total = sum(p.numel() for p in model.parameters())
    return TrainableSummary(sum(p.numel() for p in model.parameters() if p.requires_grad), total)


def _check_count(model: nn.Module, requested: int, available: int, field_name: str) -> None:
    if requested > available:
        raise JobFailure(
            "INVALID_SPEC", f"{field_name} is {requested} but {type(model).__name__} has only {available} blocks"
        )


def _freeze_bottom(model: nn.Module, count: int, field_name: str) -> None:
    """Freezes the stem and the lowest `count` blocks."""
    layout = layout_of(model)
    _check_count(model, count, len(layout.blocks), field_name)
    _set_trainable(layout.stem, False)
    for block in layout.blocks[:count]:
        _set_trainable(block, False)


class GradualUnfreezer:
    """GRADUAL_UNFREEZING: the head first; then, every `every` epochs, the top of the backbone and one more block
    from the top. The stem (embeddings) stays frozen."""

    def __init__(self, model: nn.Module, every_epochs: int):
        self.layout = layout_of(model)
        self.every_epochs = every_epochs

    def groups_for_epoch(self, epoch: int) -> int:
        """How many blocks train in this epoch (counted from 1)."""
        return min(len(self.layout.blocks), (epoch - 1) // self.every_epochs)

    def apply(self, epoch: int) -> int:
        unfrozen = self.groups_for_epoch(epoch)
        _set_trainable(self.layout.top, unfrozen > 0)
        for index, block in enumerate(self.layout.blocks):
            _set_trainable(block, index >= len(self.layout.blocks) - unfrozen)
        return unfrozen

    def eventually_trainable(self) -> list[nn.Parameter]:
        return [*self.layout.head, *self.layout.top, *(p for block in self.layout.blocks for p in block)]


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


@dataclass(frozen=True)
class TrainableParameter:
    """A parameter the optimizer holds, with what its learning rate depends on."""

    parameter: nn.Parameter
    name: str
    is_head: bool
    depth: int
    """Layer-wise decay exponent (0 for the head and when decay is off)."""


def plan_parameters(
    model: nn.Module, layer_decay: bool, unfreezer: GradualUnfreezer | None
) -> list[TrainableParameter]:
    """Every parameter that trains now or later (gradual unfreezing), tagged for the optimizer's groups.

    A LoRA model (peft) marks its head as `modules_to_save`; anything else is split by the backbone boundary.
    """
    later = {id(p) for p in unfreezer.eventually_trainable()} if unfreezer else set()
    if getattr(model, "peft_config", None) is not None:
        return [
            TrainableParameter(p, name, "modules_to_save" in name, 0)
            for name, p in model.named_parameters()
            if p.requires_grad
        ]
    backbone_ids = {id(p) for p in backbone_of(model).parameters()}
    depth = layout_of(model).depth_of() if layer_decay else {}
    return [
        TrainableParameter(p, name, id(p) not in backbone_ids, depth.get(id(p), 0))
        for name, p in model.named_parameters()
        if p.requires_grad or id(p) in later
    ]
