"""Preference optimisation: DPO on chosen and rejected answers to the same prompt, the starting model as reference."""

from tuneforge.workers.tasks.definition import TaskDefinition, TaskFlag
from tuneforge.workers.tasks.text_classification import MAX_SEQ_LENGTH

DEFINITION = TaskDefinition(
    name="preference_optimization",
    modality="text",
    metrics=("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_chosen_reward", "eval_rejected_reward"),
    lower_is_better=frozenset({"eval_loss", "eval_rejected_reward"}),
    reads=frozenset({"data.max_sequence_length", "hyperparameters.label_smoothing", "hyperparameters.preference_beta"}),
    methods=frozenset({"full", "lora"}),
    generates=True,
    field_ranges={"hyperparameters.label_smoothing": (0.0, 0.5)},
    flags=(
        MAX_SEQ_LENGTH,
        TaskFlag(
            "--beta",
            "hyperparameters.preference_beta",
            float,
            "DPO's beta: how far the tuned model may move from the reference (default 0.1; larger stays closer)",
        ),
    ),
)
