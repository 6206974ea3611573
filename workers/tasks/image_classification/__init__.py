"""Image classification: an archive of images, one folder (or a manifest row) per label."""

from tuneforge.workers.tasks.definition import CLASSIFICATION_METRICS, CLASSIFIER_FIELDS, TaskDefinition

DEFINITION = TaskDefinition(
    name="image_classification",
    modality="image",
    metrics=CLASSIFICATION_METRICS,
    reads=CLASSIFIER_FIELDS | {"data.augmentation"},
)
