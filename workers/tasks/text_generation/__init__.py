"""Text generation: causal language model fine-tuning on chat conversations, prompt/completion pairs or plain text."""

from tuneforge.workers.tasks.definition import TaskDefinition, TaskFlag
from tuneforge.workers.tasks.text_classification import MAX_SEQ_LENGTH

DEFINITION = TaskDefinition(
    name="text_generation",
    modality="text",
    metrics=("eval_loss", "eval_perplexity", "eval_exact_match", "eval_rouge_l"),
    lower_is_better=frozenset({"eval_loss", "eval_perplexity"}),
    metric_needs={
        "eval_exact_match": "evaluation.generation_samples",
        "eval_rouge_l": "evaluation.generation_samples",
    },
    reads=frozenset(
        {"data.max_sequence_length", "data.train_on_all_tokens", "data.packing", "evaluation.generation_samples"}
    ),
    methods=frozenset({"full", "lora"}),
    generates=True,
    flags=(
        MAX_SEQ_LENGTH,
        TaskFlag(
            "--train-on-all-tokens",
            "data.train_on_all_tokens",
            bool,
            "train on prompts and user turns too, not only on what the model should write",
        ),
        TaskFlag(
            "--packing",
            "data.packing",
            bool,
            "pack short examples into sequences of --max-seq-length tokens (no attention across them, no padding)",
        ),
    ),
)
