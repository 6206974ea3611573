"""Automatic hyperparameters and few-shot mode through the real server: the choices are stored on the job with
their evidence in its events, a value cannot be both automatic and set by hand, and a few-shot job reports the
prototype baseline beside its own accuracy."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.integration.helpers import STATE, log_lines, text_spec, wait_for_end
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.v1 import job_spec_pb2 as pb

pytestmark = pytest.mark.integration


def test_automatic_choices_are_stored_with_their_evidence(
    client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    spec = text_spec(tiny_bert, dataset_file)
    spec.hyperparameters.learning_rate = 0
    spec.hyperparameters.epochs = 0
    spec.hyperparameters.auto.CopyFrom(pb.AutoHyperparameters(learning_rate=True, epochs=True, range_test_steps=50))
    final = wait_for_end(client, client.create_job(spec).name)
    assert final.state == STATE.SUCCEEDED, final.error
    assert set(final.auto_choices) == {"hyperparameters.learning_rate", "hyperparameters.epochs"}
    assert final.progress.total_epochs == final.auto_choices["hyperparameters.epochs"]
    choices = [e.auto_choice for e in client.list_job_events(final.name) if e.WhichOneof("payload") == "auto_choice"]
    by_field = {c.field: c for c in choices}
    assert len(by_field["hyperparameters.learning_rate"].evidence) >= 10
    assert by_field["hyperparameters.learning_rate"].value == final.auto_choices["hyperparameters.learning_rate"]
    assert "range test" in by_field["hyperparameters.learning_rate"].reason


def test_a_value_cannot_be_automatic_and_set_by_hand(
    client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    spec = text_spec(tiny_bert, dataset_file)  # sets learning_rate and epochs
    spec.hyperparameters.auto.learning_rate = True
    spec.hyperparameters.auto.epochs = True
    with pytest.raises(TuneforgeError) as refused:
        client.create_job(spec)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(refused.value.field_violations) == {
        "job.spec.hyperparameters.learning_rate",
        "job.spec.hyperparameters.epochs",
    }


def test_few_shot_defaults_and_the_prototype_baseline(
    client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    spec = pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION,
        base_model=str(tiny_bert),
        data=pb.DataSpec(training_file=dataset_file, shots_per_class=4),
        hyperparameters=pb.Hyperparameters(batch_size=4, learning_rate=3e-3, seed=1),
    )
    final = wait_for_end(client, client.create_job(spec).name)
    assert final.state == STATE.SUCCEEDED, final.error
    assert final.progress.total_epochs == 30, "few-shot runs longer by default"
    assert {"eval_accuracy", "prototype_accuracy"} <= set(final.artifact.metrics), "both figures on the job"
    notes = log_lines(client.list_job_events(final.name))
    assert any(n.startswith("adaptation lora") for n in notes), "LoRA unless told otherwise"
    assert "few-shot: training on 12 examples (4 per class at most)" in notes
