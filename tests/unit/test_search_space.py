"""Sweep specs: field paths and domains checked against JobSpec, every choice probed through the job validator,
trial values written into a copy of the base spec, and each algorithm and pruner built from Optuna."""

from __future__ import annotations

import optuna
import pytest
from google.protobuf import struct_pb2

from tuneforge.server.search_space import make_pruner, make_sampler, plan_search, trial_spec
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import sweeps_pb2 as sw


def base() -> pb.JobSpec:
    return pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION,
        base_model="org/tiny-model",
        data=pb.DataSpec(training_file="files/f", validation_fraction=0.2),
    )


def values(*items: object) -> sw.Categorical:
    converted = []
    for item in items:
        if isinstance(item, bool):
            converted.append(struct_pb2.Value(bool_value=item))
        elif isinstance(item, int | float):
            converted.append(struct_pb2.Value(number_value=float(item)))
        else:
            converted.append(struct_pb2.Value(string_value=str(item)))
    return sw.Categorical(values=converted)


def spec(*parameters: sw.Parameter, **fields: object) -> sw.SweepSpec:
    return sw.SweepSpec(base=base(), parameters=list(parameters), **fields)  # type: ignore[arg-type]


LR = sw.Parameter(field="hyperparameters.learning_rate", float_range=sw.FloatRange(min=1e-5, max=1e-2, log=True))
SCHEDULE = sw.Parameter(field="hyperparameters.schedule.kind", categorical=values("COSINE", "LINEAR"))
BATCH = sw.Parameter(field="hyperparameters.batch_size", categorical=values(8, 16))


def test_a_good_spec_gets_defaults_and_distributions() -> None:
    plan, bad = plan_search(spec(LR, SCHEDULE, BATCH, objective=sw.Objective(metric="eval_accuracy")), [])
    assert bad == [] and plan is not None
    assert plan.maximize and plan.max_trials == 10 and plan.parallelism == 1
    assert isinstance(plan.distributions["hyperparameters.learning_rate"], optuna.distributions.FloatDistribution)
    assert plan.distributions["hyperparameters.batch_size"].choices == (8, 16)  # type: ignore[attr-defined]


def test_trial_values_are_written_into_a_copy_of_the_base() -> None:
    params = {
        "hyperparameters.learning_rate": 0.003,
        "hyperparameters.schedule.kind": "COSINE",
        "adaptation.method": "LORA",
    }
    original = base()
    written = trial_spec(original, params, "eval_macro_f1")
    assert written.hyperparameters.learning_rate == 0.003
    assert written.hyperparameters.schedule.kind == pb.Schedule.COSINE
    assert written.adaptation.method == pb.Adaptation.LORA
    assert written.evaluation.best_metric == "eval_macro_f1", "each trial keeps its best model by the objective"
    assert original.hyperparameters.learning_rate == 0.0


@pytest.mark.parametrize(
    ("parameter", "field", "text"),
    [
        (sw.Parameter(field="hyperparameters.nope", float_range=sw.FloatRange(min=0, max=1)), "field", "not a scalar"),
        (sw.Parameter(field="data", float_range=sw.FloatRange(min=0, max=1)), "field", "not a scalar"),
        (sw.Parameter(field="hyperparameters.epochs", float_range=sw.FloatRange(min=0, max=1)), "float_range", "float"),
        (
            sw.Parameter(field="hyperparameters.learning_rate", float_range=sw.FloatRange(min=0, max=1, log=True)),
            "float_range",
            "min > 0",
        ),
        (sw.Parameter(field="hyperparameters.epochs", int_range=sw.IntRange(min=5, max=2)), "int_range", "min <= max"),
        (
            sw.Parameter(field="adaptation.method", categorical=values("FULL", "SIDEWAYS")),
            "categorical.values[1]",
            "one of",
        ),
        (sw.Parameter(field="hyperparameters.batch_size", categorical=values(8, 8)), "categorical.values", "distinct"),
        (sw.Parameter(field="hyperparameters.batch_size", categorical=values(8.5)), "categorical.values[0]", "type"),
        (sw.Parameter(field="hyperparameters.epochs"), "", "needs a domain"),
    ],
)
def test_bad_parameters_name_their_field(parameter: sw.Parameter, field: str, text: str) -> None:
    plan, bad = plan_search(spec(parameter), [])
    assert plan is None
    path = "sweep.spec.parameters[0]" + (f".{field}" if field else "")
    assert [v.field for v in bad] == [path] and text in bad[0].description, bad


def test_domain_ends_the_job_would_refuse_are_refused_at_creation() -> None:
    too_high = sw.Parameter(field="hyperparameters.learning_rate", float_range=sw.FloatRange(min=1e-3, max=50.0))
    plan, bad = plan_search(spec(too_high), [])
    assert plan is None and bad[0].field == "sweep.spec.parameters[0]"
    assert "hyperparameters.learning_rate=50.0" in bad[0].description


def test_a_domain_end_is_refused_at_its_own_index_alongside_other_problems() -> None:
    """The probe counts only what a point itself breaks, so it runs even when the base and another parameter are
    wrong too, and names the parameter by its place in the request."""
    nope = sw.Parameter(field="hyperparameters.nope", int_range=sw.IntRange(min=1, max=2))
    too_high = sw.Parameter(field="hyperparameters.learning_rate", float_range=sw.FloatRange(min=1e-3, max=50.0))
    broken = spec(nope, too_high)
    broken.base.data.validation_fraction = 2.0
    plan, bad = plan_search(broken, [])
    assert plan is None
    assert {v.field: v.description.split(":")[0] for v in bad} == {
        "sweep.spec.parameters[0].field": "'hyperparameters.nope' is not a scalar field of JobSpec",
        "sweep.spec.parameters[1]": "hyperparameters.learning_rate=50.0",
        "sweep.spec.base.data.validation_fraction": "must be in [0.0, 0.5], got 2.0",
    }, bad


def test_limits_objective_and_algorithm_rules() -> None:
    _, bad = plan_search(spec(LR, max_trials=5000, parallelism=-1, objective=sw.Objective(metric="eval_wer")), [])
    assert {v.field for v in bad} == {"sweep.spec.max_trials", "sweep.spec.parallelism", "sweep.spec.objective.metric"}
    _, bad = plan_search(spec(LR, algorithm=sw.SweepSpec.GRID), [])
    assert [v.field for v in bad] == ["sweep.spec.algorithm"]
    _, bad = plan_search(spec(SCHEDULE, algorithm=sw.SweepSpec.CMA_ES), [])
    assert [v.field for v in bad] == ["sweep.spec.algorithm"]
    _, bad = plan_search(sw.SweepSpec(base=base()), [])
    assert [v.field for v in bad] == ["sweep.spec.parameters"]


def test_grid_caps_the_trials_at_its_size() -> None:
    plan, _ = plan_search(spec(SCHEDULE, BATCH, algorithm=sw.SweepSpec.GRID, max_trials=100), [])
    assert plan is not None and plan.max_trials == 4


@pytest.mark.parametrize(
    ("algorithm", "sampler"),
    [
        (sw.SweepSpec.TPE, optuna.samplers.TPESampler),
        (sw.SweepSpec.RANDOM, optuna.samplers.RandomSampler),
        (sw.SweepSpec.CMA_ES, optuna.samplers.CmaEsSampler),
    ],
)
@pytest.mark.parametrize(
    ("pruner_kind", "pruner"),
    [
        (sw.SweepSpec.NONE, optuna.pruners.NopPruner),
        (sw.SweepSpec.MEDIAN, optuna.pruners.MedianPruner),
        (sw.SweepSpec.SUCCESSIVE_HALVING, optuna.pruners.SuccessiveHalvingPruner),
        (sw.SweepSpec.HYPERBAND, optuna.pruners.HyperbandPruner),
    ],
)
def test_each_algorithm_and_pruner_runs_a_small_study(
    algorithm: int, sampler: type, pruner_kind: int, pruner: type
) -> None:
    plan, bad = plan_search(spec(LR, algorithm=algorithm, pruner=pruner_kind, seed=3), [])
    assert plan is not None, bad
    built_sampler, built_pruner = make_sampler(plan), make_pruner(plan)
    assert isinstance(built_sampler, sampler) and isinstance(built_pruner, pruner)
    study = optuna.create_study(sampler=built_sampler, pruner=built_pruner, direction="minimize")
    for _ in range(6):  # the ask/tell loop the controller runs
        trial = study.ask(plan.distributions)
        lr = trial.params["hyperparameters.learning_rate"]
        for step in range(1, 4):
            trial.report(abs(lr - 1e-3) * step, step)
        study.tell(trial, abs(lr - 1e-3))
    assert len(study.trials) == 6 and 1e-5 <= study.best_params["hyperparameters.learning_rate"] <= 1e-2


@pytest.mark.parametrize(
    ("task", "metric", "maximize"),
    [
        (pb.TEXT_GENERATION, "eval_perplexity", False),
        (pb.TEXT_GENERATION, "eval_exact_match", True),
        (pb.PREFERENCE_OPTIMIZATION, "eval_reward_accuracy", True),
        (pb.PREFERENCE_OPTIMIZATION, "eval_rejected_reward", False),
    ],
)
def test_generative_tasks_sweep_their_own_fields_toward_their_metrics_goal(
    task: int, metric: str, maximize: bool
) -> None:
    swept = spec(
        LR, sw.Parameter(field="adaptation.lora.rank", categorical=values(8, 16)), objective=sw.Objective(metric=metric)
    )
    swept.base.task = task  # type: ignore[assignment]
    swept.base.adaptation.method = pb.Adaptation.LORA
    own = "data.packing" if task == pb.TEXT_GENERATION else "hyperparameters.preference_beta"
    choices = values(True, False) if own == "data.packing" else values(0.05, 0.5)
    swept.parameters.append(sw.Parameter(field=own, categorical=choices))
    plan, bad = plan_search(swept, [])
    assert bad == [] and plan is not None and plan.maximize is maximize and own in plan.distributions


def test_a_sweep_cannot_reach_a_value_its_task_refuses() -> None:
    """DPO's label smoothing stays below 0.5 (a task's own narrower range), which the probe checks at creation."""
    smoothing = sw.Parameter(field="hyperparameters.label_smoothing", float_range=sw.FloatRange(min=0.0, max=0.6))
    swept = spec(smoothing, objective=sw.Objective(metric="eval_reward_accuracy"))
    swept.base.task = pb.PREFERENCE_OPTIMIZATION
    plan, bad = plan_search(swept, [])
    assert plan is None and bad[0].field == "sweep.spec.parameters[0]"
    assert (
        "hyperparameters.label_smoothing=0.6" in bad[0].description and "PREFERENCE_OPTIMIZATION" in bad[0].description
    )
