"""The tasks' light definitions as the server and the client use them: every task-specific JobSpec field is accepted
for exactly the tasks that read it and refused, by its path, for the others; every task flag of `tuneforge submit`
sets its field; each task is the proto enum value of its name and takes Predict inputs of its own kind."""

from __future__ import annotations

import argparse

import pytest

from tuneforge.clients.spec_flags import TASKS, add_spec_arguments, spec_from_arguments, task_flags
from tuneforge.server.errors import ApiError
from tuneforge.server.predict_inputs import check_predict_inputs
from tuneforge.server.spec_validation import validate_spec
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2
from tuneforge.workers.tasks import registry
from tuneforge.workers.tasks.definition import TASK_FIELDS, field_holder

GIVEN = {
    "data.text_column": "body",
    "data.text_pair_column": "second",
    "data.max_sequence_length": 64,
    "data.augmentation": pb.Augmentation(enabled=True),
    "data.clip_seconds": 2.0,
    "data.transcript_column": "words",
    "data.shots_per_class": 4,
    "head": pb.HeadSpec(hidden_sizes=[8]),
    "hyperparameters.label_smoothing": 0.1,
    "hyperparameters.class_balance": pb.Hyperparameters.WEIGHTED_LOSS,
    "data.train_on_all_tokens": True,
    "data.packing": True,
    "evaluation.generation_samples": 4,
    "hyperparameters.preference_beta": 0.5,
    "data.language": "en",
}
"""A valid, non-default value for every task-specific field."""
TASK_NAMES = list(registry.definitions())


def spec_for(task: str) -> pb.JobSpec:
    return pb.JobSpec(
        task=pb.Task.Value(task.upper()), base_model="org/model", data=pb.DataSpec(training_file="files/f1")
    )


def given(spec: pb.JobSpec, path: str) -> pb.JobSpec:
    holder, name = field_holder(spec, path)
    value = GIVEN[path]
    if hasattr(value, "ListFields"):
        getattr(holder, name).CopyFrom(value)
    else:
        setattr(holder, name, value)
    return spec


def test_every_task_field_has_a_value_here() -> None:
    assert set(GIVEN) == set(TASK_FIELDS)


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("path", TASK_FIELDS)
def test_a_task_field_is_accepted_only_by_the_tasks_that_read_it(task: str, path: str) -> None:
    definition = registry.definition(task)
    result = validate_spec(given(spec_for(task), path), [])
    problems = {v.field: v.description for v in result.violations}
    if path in definition.reads:
        assert problems == {} and result.spec is not None
    else:
        readers = " or ".join(reader.enum_name for reader in registry.readers(path))
        assert problems == {f"job.spec.{path}": f"only used with {readers}, not {definition.enum_name}"}


@pytest.mark.parametrize("task", [name for name in TASK_NAMES if registry.definition(name).field_ranges])
def test_a_task_narrows_a_shared_fields_range(task: str) -> None:
    definition = registry.definition(task)
    for path, (low, high) in definition.field_ranges.items():
        spec = spec_for(task)
        holder, name = field_holder(spec, path)
        setattr(holder, name, high)
        problems = {v.field: v.description for v in validate_spec(spec, []).violations}
        assert problems == {f"job.spec.{path}": f"must be in [{low}, {high}) for {definition.enum_name}, got {high}"}
        setattr(holder, name, (low + high) / 2)
        assert validate_spec(spec, []).spec is not None


@pytest.mark.parametrize("task", TASK_NAMES)
def test_a_best_metric_must_be_one_the_task_reports(task: str) -> None:
    definition = registry.definition(task)
    for metric in definition.metrics:
        spec = spec_for(task)
        spec.evaluation.best_metric = metric
        needs = definition.metric_needs.get(metric)
        if needs:
            problems = {v.field: v.description for v in validate_spec(spec, []).violations}
            assert problems == {"job.spec.evaluation.best_metric": f"{metric} is measured only when {needs} is set"}
            given(spec, needs)
        assert validate_spec(spec, []).spec is not None
    spec = spec_for(task)
    spec.evaluation.best_metric = "eval_bleu"
    problems = {v.field: v.description for v in validate_spec(spec, []).violations}
    assert problems == {
        "job.spec.evaluation.best_metric": f"must be one of {', '.join(definition.metrics)} for "
        f"{definition.enum_name}, got 'eval_bleu'"
    }


def test_each_task_is_the_proto_enum_value_of_its_name_and_an_unknown_one_is_refused() -> None:
    assert {name.lower() for name in pb.Task.DESCRIPTOR.values_by_name if name != "TASK_UNSPECIFIED"} == set(TASK_NAMES)
    assert sorted(TASKS) == sorted(name.replace("_", "-") for name in TASK_NAMES)
    spec = spec_for(TASK_NAMES[0])
    spec.task = 999
    problems = {v.field: v.description for v in validate_spec(spec, []).violations}
    assert problems["job.spec.task"] == "required: one of " + ", ".join(name.upper() for name in TASK_NAMES)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_predict_takes_the_kind_of_input_the_task_declares(task: str) -> None:
    wanted = registry.definition(task).modality
    value: str | bytes = "words" if wanted == "text" else b"\x00"
    right = jobs_pb2.PredictRequest(inputs=[jobs_pb2.PredictInput(**{wanted: value})])
    assert check_predict_inputs(right, spec_for(task)) == [(wanted, value)]
    other = "image" if wanted != "image" else "audio"
    wrong = jobs_pb2.PredictRequest(inputs=[jobs_pb2.PredictInput(**{other: b"\x00"})])
    with pytest.raises(ApiError) as refused:
        check_predict_inputs(wrong, spec_for(task))
    assert [(v.field, v.description) for v in refused.value.violations] == [
        ("inputs[0]", f"this job's model takes {wanted}, not {other}")
    ]


FLAG_VALUES: dict[object, list[str]] = {int: ["64"], float: ["2.5"], str: ["body"], bool: []}
PARSED: dict[object, object] = {int: 64, float: 2.5, str: "body", bool: True}


@pytest.mark.parametrize("flag", sorted(task_flags()))
def test_a_task_flag_sets_its_field_and_the_tasks_it_names_accept_it(flag: str) -> None:
    declared, cli_names = task_flags()[flag]
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    for cli_name in TASKS:
        given = FLAG_VALUES[declared.type]
        args = parser.parse_args(["--task", cli_name, "--model", "org/model", "--train", "files/f1", flag, *given])
        spec = spec_from_arguments(args)
        assert getattr(*field_holder(spec, declared.field)) == PARSED[declared.type]
        problems = {v.field for v in validate_spec(spec, []).violations}
        assert problems == (set() if cli_name in cli_names else {f"job.spec.{declared.field}"})


@pytest.mark.parametrize("task", TASK_NAMES)
def test_an_adaptation_method_the_task_does_not_train_with_is_refused(task: str) -> None:
    definition = registry.definition(task)
    for method in pb.Adaptation.Method.DESCRIPTOR.values_by_name:
        if method == "METHOD_UNSPECIFIED":
            continue
        spec = spec_for(task)
        spec.adaptation.method = pb.Adaptation.Method.Value(method)
        if method == "FREEZE_FIRST_BLOCKS":
            spec.adaptation.num_frozen_blocks = 1
        if method == "LAST_BLOCKS_TRAINABLE":
            spec.adaptation.num_trainable_blocks = 1
        problems = {v.field: v.description for v in validate_spec(spec, []).violations}
        if definition.methods is None or method.lower() in definition.methods:
            assert problems == {}
        else:
            allowed = " or ".join(sorted(m.upper() for m in definition.methods))
            assert problems == {
                "job.spec.adaptation.method": f"{definition.enum_name} trains with {allowed}, not {method}"
            }


def test_without_task_flags_the_spec_leaves_those_fields_unset() -> None:
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    spec = spec_from_arguments(parser.parse_args(["--model", "org/model", "--train", "files/f1"]))
    assert spec.data.max_sequence_length == 0 and spec.data.clip_seconds == 0 and spec.data.text_column == ""
