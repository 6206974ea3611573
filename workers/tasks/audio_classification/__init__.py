"""Audio classification: an archive of clips, one folder (or a manifest row) per label."""

from tuneforge.workers.tasks.definition import CLASSIFICATION_METRICS, CLASSIFIER_FIELDS, TaskDefinition, TaskFlag

CLIP_SECONDS = TaskFlag(
    "--clip-seconds",
    "data.clip_seconds",
    float,
    "clip length (audio classification) or longest utterance (speech recognition), in seconds",
)

DEFINITION = TaskDefinition(
    name="audio_classification",
    modality="audio",
    metrics=CLASSIFICATION_METRICS,
    reads=CLASSIFIER_FIELDS | {"data.augmentation", "data.clip_seconds"},
    flags=(CLIP_SECONDS,),
)
