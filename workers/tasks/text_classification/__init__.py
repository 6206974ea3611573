"""Text classification: single texts or text pairs (JSONL or CSV rows) to one of N labels."""

from tuneforge.workers.tasks.definition import CLASSIFICATION_METRICS, CLASSIFIER_FIELDS, TaskDefinition, TaskFlag

MAX_SEQ_LENGTH = TaskFlag(
    "--max-seq-length", "data.max_sequence_length", int, "tokens a text is cut to (default: the model's, at most 512)"
)

DEFINITION = TaskDefinition(
    name="text_classification",
    modality="text",
    metrics=CLASSIFICATION_METRICS,
    reads=CLASSIFIER_FIELDS | {"data.text_column", "data.text_pair_column", "data.max_sequence_length"},
    flags=(
        TaskFlag("--text-column", "data.text_column", str, "the text's column (default: text)"),
        TaskFlag("--text-pair-column", "data.text_pair_column", str, "a second text's column, for text pairs"),
        MAX_SEQ_LENGTH,
    ),
)
