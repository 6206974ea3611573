"""The resolved training specification: plain frozen dataclasses shared by the server and the training core.

The server converts the API's JobSpec into these (filling every default) and the worker trains from them. Nothing
here imports torch or gRPC, so both sides can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class AdaptationMethod(StrEnum):
    """Which weights train."""

    FULL = "full"
    FROZEN_BACKBONE = "frozen_backbone"
    FREEZE_FIRST_BLOCKS = "freeze_first_blocks"
    LORA = "lora"
    LAST_BLOCKS_TRAINABLE = "last_blocks_trainable"
    GRADUAL_UNFREEZING = "gradual_unfreezing"


class OptimizerKind(StrEnum):
    """The optimizer."""

    ADAMW = "adamw"
    SGD = "sgd"
    ADAM = "adam"


class ClassBalance(StrEnum):
    """How imbalanced classes are handled."""

    NONE = "none"
    WEIGHTED_LOSS = "weighted_loss"
    BALANCED_SAMPLING = "balanced_sampling"


class Precision(StrEnum):
    """Numeric precision of forward and backward passes."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class ScheduleKind(StrEnum):
    """The learning-rate decay after warmup."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"
    STEP = "step"
    EXPONENTIAL = "exponential"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    MULTI_STEP = "multi_step"
    POLYNOMIAL = "polynomial"
    ONE_CYCLE = "one_cycle"
    REDUCE_ON_PLATEAU = "reduce_on_plateau"


class Activation(StrEnum):
    """Non-linearity in a custom head."""

    RELU = "relu"
    GELU = "gelu"
    TANH = "tanh"


@dataclass(frozen=True)
class AugmentationSettings:
    """Train-time augmentation, resolved (0 or False: off)."""

    crop_scale_min: float = 0.5
    horizontal_flip: bool = True
    color_jitter: float = 0.2
    max_gain_db: float = 6.0
    noise_snr_db: float = 20.0
    max_shift_seconds: float = 0.1
    spec_augment: bool = True


@dataclass(frozen=True)
class DataSettings:
    """How the training and validation data are read."""

    training_file: str
    """Resource name of the training file, `files/{file}`."""
    validation_file: str | None = None
    """Resource name of the validation file, if any."""
    validation_fraction: float = 0.0
    """Stratified fraction of the training data held out when there is no validation file."""
    text_column: str = "text"
    """Column holding the text."""
    text_pair_column: str | None = None
    """Column holding the second text of a pair, if any."""
    label_column: str = "label"
    """Column holding the label."""
    max_sequence_length: int = 0
    """Longest input in tokens; 0 means min(model maximum, 512)."""
    augmentation: AugmentationSettings | None = None
    """Train-time augmentation; None: off."""
    clip_seconds: float = 0.0
    """Audio clip length (classification) or longest utterance (speech recognition); 0: the task's default."""
    file_column: str = "file"
    transcript_column: str = "transcript"
    shots_per_class: int = 0
    """Few-shot: train on this many examples per class (0: all)."""
    train_on_all_tokens: bool = False
    """Text generation: the loss covers every token, not only what the model should learn to write."""
    packing: bool = False
    """Text generation: short examples share sequences of max_sequence_length tokens (padding-free)."""
    language: str = ""
    """Encoder-decoder speech recognition: the utterances' language (empty: none or detected)."""


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapter settings."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdaptationSettings:
    """Which parameters train."""

    method: AdaptationMethod = AdaptationMethod.FULL
    num_frozen_blocks: int = 0
    """Blocks frozen by FREEZE_FIRST_BLOCKS."""
    lora: LoraSettings | None = None
    num_trainable_blocks: int = 0
    """Blocks trained by LAST_BLOCKS_TRAINABLE."""
    unfreeze_every_epochs: int = 1
    """GRADUAL_UNFREEZING: epochs between unfreezing one more block."""


@dataclass(frozen=True)
class HeadSettings:
    """A custom classification head replacing the model's final linear layer."""

    hidden_sizes: tuple[int, ...] = ()
    activation: Activation = Activation.RELU
    dropout: float = 0.0


@dataclass(frozen=True)
class ScheduleSettings:
    """Learning-rate schedule: linear warmup, then the decay."""

    kind: ScheduleKind = ScheduleKind.LINEAR
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    step_size: int = 0
    """STEP: optimizer steps between decays; 0 means one epoch."""
    gamma: float = 0.0
    """STEP/EXPONENTIAL decay factor; 0 means the kind's default."""
    min_lr_ratio: float = 0.0
    milestones: tuple[int, ...] = ()
    """MULTI_STEP: steps at which the rate is multiplied by gamma."""
    num_cycles: int = 1
    """COSINE_WITH_RESTARTS: cosine cycles."""
    power: float = 1.0
    """POLYNOMIAL: degree."""
    patience: int = 1
    """REDUCE_ON_PLATEAU: evaluations without improvement before a drop."""


@dataclass(frozen=True)
class AutoSettings:
    """Hyperparameters the job chooses for itself before training."""

    learning_rate: bool = False
    micro_batch_size: bool = False
    epochs: bool = False
    range_test_min_learning_rate: float = 1e-7
    range_test_max_learning_rate: float = 1.0
    range_test_steps: int = 100

    @property
    def any(self) -> bool:
        return self.learning_rate or self.micro_batch_size or self.epochs


@dataclass(frozen=True)
class Hyperparameters:
    """Optimisation settings with every default filled in."""

    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    momentum: float = 0.9
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    gradient_accumulation_steps: int = 1
    seed: int = 0
    max_steps: int = 0
    """0 means no limit."""
    nesterov: bool = False
    compile: bool = False
    """torch.compile the model before training."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (transformers' gradient checkpointing)."""
    head_learning_rate: float = 0.0
    """0 means learning_rate."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay; 1 is off."""
    label_smoothing: float = 0.0
    preference_beta: float = 0.1
    """DPO's beta (preference optimisation)."""
    class_balance: ClassBalance = ClassBalance.NONE
    precision: Precision = Precision.AUTO
    max_skipped_non_finite_steps: int = 0
    """Steps with a NaN or infinite loss skipped (no update) before the job fails."""
    auto: AutoSettings = field(default_factory=AutoSettings)


@dataclass(frozen=True)
class EvaluationSettings:
    """When the job evaluates, logs and checkpoints."""

    eval_every_steps: int = 0
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0
    evaluate_before_training: bool = False
    best_metric: str = "eval_loss"
    """Picks the best checkpoint (the artifact), drives early stopping and REDUCE_ON_PLATEAU."""
    early_stopping_patience: int = 0
    """Evaluations without improvement before stopping; 0 never stops early."""
    early_stopping_min_delta: float = 0.0
    keep_checkpoints: int = 1
    """Newest resumable checkpoints kept (the best one is kept besides)."""
    generation_samples: int = 0
    """Text generation: held-out prompts answered greedily and scored at each evaluation (0: none)."""


@dataclass(frozen=True)
class TrainingSpec:
    """Everything the training core needs to know about a job, defaults resolved."""

    task: str
    """The task's name: its package under workers/tasks (`text_classification` ...)."""
    base_model: str
    data: DataSettings
    adaptation: AdaptationSettings = field(default_factory=AdaptationSettings)
    head: HeadSettings | None = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    gpus: int = 0
    ranks: int = 1
    """Data-parallel training processes (one per GPU; on a CPU worker, gloo processes)."""
    priority: int = 0
    max_runtime_s: float = 0.0
    """Running time allowed over all attempts; 0 means no limit."""
    export_formats: tuple[str, ...] = ()
    """Exports made and checked when training ends (workers.core.export.ExportFormat values)."""
    onnx_opset: int = 18

    @property
    def maximize(self) -> bool:
        """Whether a higher best_metric is better, as the task says (losses and error rates are minimised)."""
        from tuneforge.workers.tasks import registry

        return registry.definition(self.task).maximizes(self.evaluation.best_metric)
