"""The resolved spec stored with a job comes back exactly: every nested setting, enum, tuple and optional part."""

from __future__ import annotations

import json

import pytest

from tuneforge.server.spec_validation import validate_spec
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.workers.spec import AugmentationSettings, HeadSettings, LoraSettings, TrainingSpec
from tuneforge.workers.spec_json import spec_from_json, spec_to_json


def resolved(spec: pb.JobSpec) -> TrainingSpec:
    result = validate_spec(spec, [])
    assert result.spec is not None, result.violations
    return result.spec


def test_every_part_of_a_resolved_spec_round_trips() -> None:
    spec = pb.JobSpec(task=pb.IMAGE_CLASSIFICATION, base_model="org/vit", data=pb.DataSpec(training_file="files/f"))
    spec.data.validation_fraction = 0.2
    spec.data.augmentation.enabled = True
    spec.data.augmentation.crop_scale_min = 0.6
    spec.adaptation.method = pb.Adaptation.LORA
    spec.adaptation.lora.target_modules.extend(["query", "value"])
    spec.head.hidden_sizes.extend([16, 8])
    spec.export.formats.extend([pb.ONNX, pb.TORCHSCRIPT])
    spec.hyperparameters.schedule.kind = pb.Schedule.COSINE_WITH_RESTARTS
    original = resolved(spec)
    assert isinstance(original.head, HeadSettings) and isinstance(original.adaptation.lora, LoraSettings)
    assert isinstance(original.data.augmentation, AugmentationSettings)
    back = spec_from_json(spec_to_json(original))
    assert back == original
    assert type(back.adaptation.method) is type(original.adaptation.method)
    assert back.head is not None and back.head.hidden_sizes == (16, 8)


def test_a_spec_with_a_missing_or_unknown_field_is_refused() -> None:
    stored = json.loads(spec_to_json(resolved(pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION, base_model="org/m", data=pb.DataSpec(training_file="files/f")
    ))))  # fmt: skip
    del stored["data"]["training_file"]
    with pytest.raises(ValueError, match=r"DataSettings: fields .* are not"):
        spec_from_json(json.dumps(stored))
    stored["data"]["training_file"] = "files/f"
    stored["hyperparameters"]["from_the_future"] = 1
    with pytest.raises(ValueError, match=r"Hyperparameters: fields .* are not"):
        spec_from_json(json.dumps(stored))


def test_a_spec_stored_before_a_field_was_added_takes_its_default() -> None:
    original = resolved(
        pb.JobSpec(task=pb.TEXT_GENERATION, base_model="org/m", data=pb.DataSpec(training_file="files/f"))
    )
    stored = json.loads(spec_to_json(original))
    del stored["data"]["packing"], stored["hyperparameters"]["gradient_checkpointing"]  # as an older version wrote it
    assert spec_from_json(json.dumps(stored)) == original
