"""Each freeze policy trains exactly the parameters it should, counted, on BERT, ViT, ResNet and wav2vec2 configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    ASTConfig,
    ASTForAudioClassification,
    BertConfig,
    BertForSequenceClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    EfficientNetConfig,
    EfficientNetForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    Wav2Vec2Config,
    Wav2Vec2ForSequenceClassification,
    WhisperConfig,
    WhisperForAudioClassification,
)

from tuneforge.workers.core.adaptation import (
    GradualUnfreezer,
    apply_adaptation,
    layout_of,
    plan_parameters,
    summarize,
)
from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.core.lora import apply_lora
from tuneforge.workers.core.optimization import build_optimizer
from tuneforge.workers.spec import AdaptationMethod, AdaptationSettings, Hyperparameters, LoraSettings


def bert() -> nn.Module:
    return BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    )


def vit() -> nn.Module:
    return ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )


def resnet() -> nn.Module:
    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1]))


def wav2vec2() -> nn.Module:
    return Wav2Vec2ForSequenceClassification(
        Wav2Vec2Config(
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2,
        )
    )


MODELS = {"bert": bert, "vit": vit, "resnet": resnet, "wav2vec2": wav2vec2}


def count(parameters: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def trainable(model: nn.Module) -> int:
    return summarize(model).trainable


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param]()


def test_every_family_maps_to_stem_blocks_top_and_head(model: nn.Module) -> None:
    layout = layout_of(model)
    assert len(layout.blocks) == 3 and all(layout.blocks)
    everything = count(layout.stem) + sum(count(b) for b in layout.blocks) + count(layout.top) + count(layout.head)
    assert everything == sum(p.numel() for p in model.parameters())
    assert count(layout.head) > 0 and count(layout.stem) > 0


def test_full_trains_everything_but_a_speech_feature_encoder(model: nn.Module) -> None:
    """wav2vec2-style models keep their convolutional feature encoder frozen, as their documentation recommends."""
    apply_adaptation(model, AdaptationSettings(AdaptationMethod.FULL))
    encoder = getattr(getattr(model, "wav2vec2", None), "feature_extractor", None)
    frozen = count(list(encoder.parameters())) if encoder is not None else 0
    assert trainable(model) == sum(p.numel() for p in model.parameters()) - frozen
    assert (frozen > 0) == hasattr(model, "freeze_feature_encoder")


def test_frozen_backbone_trains_the_head_only(model: nn.Module) -> None:
    layout = layout_of(model)
    apply_adaptation(model, AdaptationSettings(AdaptationMethod.FROZEN_BACKBONE))
    assert trainable(model) == count(layout.head)


def test_freeze_first_blocks(model: nn.Module) -> None:
    layout = layout_of(model)
    apply_adaptation(model, AdaptationSettings(AdaptationMethod.FREEZE_FIRST_BLOCKS, num_frozen_blocks=2))
    assert trainable(model) == count(layout.blocks[2]) + count(layout.top) + count(layout.head)


def test_last_blocks_trainable(model: nn.Module) -> None:
    layout = layout_of(model)
    apply_adaptation(model, AdaptationSettings(AdaptationMethod.LAST_BLOCKS_TRAINABLE, num_trainable_blocks=2))
    assert trainable(model) == count(layout.blocks[1]) + count(layout.blocks[2]) + count(layout.top) + count(
        layout.head
    )
    with pytest.raises(JobFailure, match="has only 3 blocks"):
        apply_adaptation(model, AdaptationSettings(AdaptationMethod.LAST_BLOCKS_TRAINABLE, num_trainable_blocks=4))


def test_gradual_unfreezing_adds_one_block_per_stage(model: nn.Module) -> None:
    layout = layout_of(model)
    apply_adaptation(model, AdaptationSettings(AdaptationMethod.GRADUAL_UNFREEZING, unfreeze_every_epochs=2))
    unfreezer = GradualUnfreezer(model, every_epochs=2)
    head, top = count(layout.head), count(layout.top)
    expected = {
        1: head,
        2: head,
        3: head + top + count(layout.blocks[2]),
        5: head + top + count(layout.blocks[2]) + count(layout.blocks[1]),
        9: head + top + sum(count(b) for b in layout.blocks),
    }
    for epoch, number in expected.items():
        unfreezer.apply(epoch)
        assert trainable(model) == number, epoch
    planned = plan_parameters(model, False, unfreezer)
    assert count([p.parameter for p in planned]) == head + top + sum(count(b) for b in layout.blocks)


def test_lora_trains_adapters_and_the_head(model: nn.Module) -> None:
    layout = layout_of(model)
    head = count(layout.head)
    wrapped = apply_lora(model, LoraSettings(rank=2, alpha=4))  # the family's default targets
    lora = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert lora > 0
    assert trainable(wrapped) == lora + head


def test_an_architecture_without_blocks_gets_a_clear_error() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_model = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

    with pytest.raises(JobFailure, match="cannot find the blocks of Linear"):
        layout_of(Flat())


def test_discriminative_learning_rates() -> None:
    torch.manual_seed(0)
    model = bert()
    hp = Hyperparameters(learning_rate=1e-3, head_learning_rate=1e-2, layer_decay=0.5)
    optimizer = build_optimizer(plan_parameters(model, True, None), hp, torch.device("cpu"))
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    layout = layout_of(model)
    assert {rate_of[id(p)] for p in layout.head} == {1e-2}
    assert {rate_of[id(p)] for p in layout.top} == {5e-4}
    assert [{rate_of[id(p)] for p in block} for block in layout.blocks] == [{1.25e-4}, {2.5e-4}, {5e-4}]
    assert {rate_of[id(p)] for p in layout.stem} == {6.25e-5}
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert no_decay and all(p.dim() == 1 for g in no_decay for p in g["params"])


OTHER_FAMILIES = {
    "convnext": lambda: ConvNextForImageClassification(
        ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    ),
    "swin": lambda: SwinForImageClassification(
        SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2)
    ),
    "efficientnet": lambda: EfficientNetForImageClassification(
        EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=32)
    ),
    "mobilenet_v2": lambda: MobileNetV2ForImageClassification(MobileNetV2Config(image_size=32, depth_multiplier=0.35)),
    "whisper": lambda: WhisperForAudioClassification(
        WhisperConfig(
            d_model=16,
            encoder_layers=2,
            encoder_attention_heads=2,
            decoder_layers=1,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_mel_bins=8,
            max_source_positions=16,
        )
    ),
    "ast": lambda: ASTForAudioClassification(
        ASTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            num_mel_bins=16,
            max_length=32,
            frequency_stride=8,
            time_stride=8,
        )
    ),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_map_to_blocks(family: str) -> None:
    model = OTHER_FAMILIES[family]()
    layout = layout_of(model)
    assert layout.blocks and count(layout.head) > 0
    everything = count(layout.stem) + sum(count(b) for b in layout.blocks) + count(layout.top) + count(layout.head)
    assert everything == sum(p.numel() for p in model.parameters())
    apply_adaptation(model, AdaptationSettings(AdaptationMethod.LAST_BLOCKS_TRAINABLE, num_trainable_blocks=1))
    assert trainable(model) == count(layout.blocks[-1]) + count(layout.top) + count(layout.head)
