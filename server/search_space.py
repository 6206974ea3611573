"""A SweepSpec checked and turned into what Optuna needs: distributions by JobSpec field path, the objective, the
sampler and the pruner; and a trial's parameters written into a copy of the base JobSpec.

Every bad field is reported at once, with its path, like a bad JobSpec. Each parameter is probed at the ends of its
domain (and each choice) through the job validator, so a range the job would refuse is refused when the sweep is
created, not trial by trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tuneforge.server.errors import FieldViolation
from tuneforge.server.spec_validation import ROOT as SPEC_ROOT
from tuneforge.server.spec_validation import validate_spec
from tuneforge.v1 import job_spec_pb2, sweeps_pb2
from tuneforge.workers.tasks import registry

Distribution = optuna.distributions.BaseDistribution
ParamValue = str | int | float | bool

MAX_TRIALS = 1000
DEFAULT_TRIALS = 10
MAX_GRID_POINTS = 10_000
"""A grid is built whole (by Optuna too): its size is checked from the ranges before any of it exists."""
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_INTS = (
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
)


@dataclass(frozen=True)
class SearchPlan:
    """A checked SweepSpec with its defaults filled in."""

    distributions: dict[str, Distribution]
    metric: str
    maximize: bool
    algorithm: int
    pruner: int
    max_trials: int
    parallelism: int
    budget_s: float
    seed: int
    min_evaluations: int
    reduction_factor: int
    grid: dict[str, list[Any]] = field(default_factory=dict)


def plan_search(spec: sweeps_pb2.SweepSpec, model_roots: list[Path]) -> tuple[SearchPlan | None, list[FieldViolation]]:
    """Checks the sweep spec; returns the plan (None when anything is wrong) and every violation."""
    bad: list[FieldViolation] = []
    base_result = validate_spec(spec.base, model_roots)
    for violation in base_result.violations:
        inside = violation.field.removeprefix(f"{SPEC_ROOT}.")  # the job validator's paths start at a job
        bad.append(FieldViolation(f"sweep.spec.base.{inside}", violation.description))
    distributions = _distributions(spec, bad)
    base_fields = {violation.field for violation in base_result.violations}
    bad += _probe(spec, distributions, model_roots, base_fields)
    metric, maximize = _objective(spec, base_result.spec.task if base_result.spec else None, bad)
    max_trials, parallelism, budget_s = _limits(spec, bad)
    algorithm = spec.algorithm or sweeps_pb2.SweepSpec.TPE
    grid: dict[str, list[Any]] = {}
    if algorithm == sweeps_pb2.SweepSpec.GRID:
        grid = _grid(distributions, bad)
    if algorithm == sweeps_pb2.SweepSpec.CMA_ES and any(
        isinstance(d, optuna.distributions.CategoricalDistribution) for d in distributions.values()
    ):
        bad.append(FieldViolation("sweep.spec.algorithm", "CMA_ES searches float and int parameters only"))
    if bad:
        return None, bad
    if grid:
        max_trials = min(max_trials, math.prod(len(values) for values in grid.values()))
    plan = SearchPlan(
        distributions=distributions,
        metric=metric,
        maximize=maximize,
        algorithm=algorithm,
        pruner=spec.pruner or sweeps_pb2.SweepSpec.NONE,
        max_trials=max_trials,
        parallelism=min(parallelism, max_trials),
        budget_s=budget_s,
        seed=spec.seed,
        min_evaluations=spec.min_evaluations or 1,
        reduction_factor=spec.reduction_factor or 3,
        grid=grid,
    )
    return plan, []


def _distributions(spec: sweeps_pb2.SweepSpec, bad: list[FieldViolation]) -> dict[str, Distribution]:
    if not spec.parameters:
        bad.append(FieldViolation("sweep.spec.parameters", "required: at least one parameter"))
    distributions: dict[str, Distribution] = {}
    for index, parameter in enumerate(spec.parameters):
        path = f"sweep.spec.parameters[{index}]"
        distribution, problems = _distribution(parameter, path)
        bad += problems
        if parameter.field in distributions:
            bad.append(FieldViolation(f"{path}.field", f"{parameter.field} is listed twice"))
        elif distribution is not None:
            distributions[parameter.field] = distribution
    return distributions


def _objective(spec: sweeps_pb2.SweepSpec, task_name: str | None, bad: list[FieldViolation]) -> tuple[str, bool]:
    metric = spec.objective.metric or "eval_loss"
    task = registry.definition(task_name) if task_name is not None else None
    if task is not None and metric not in task.metrics:
        allowed = ", ".join(task.metrics)
        bad.append(FieldViolation("sweep.spec.objective.metric", f"must be one of {allowed}, got {metric!r}"))
    if spec.objective.goal:
        return metric, spec.objective.goal == sweeps_pb2.Objective.MAXIMIZE
    return metric, task.maximizes(metric) if task is not None else not metric.endswith("loss")


def _limits(spec: sweeps_pb2.SweepSpec, bad: list[FieldViolation]) -> tuple[int, int, float]:
    max_trials = spec.max_trials or DEFAULT_TRIALS
    if not 1 <= max_trials <= MAX_TRIALS:
        bad.append(FieldViolation("sweep.spec.max_trials", f"must be between 1 and {MAX_TRIALS}, got {max_trials}"))
    parallelism = spec.parallelism or 1
    if not 1 <= parallelism <= 64:
        bad.append(FieldViolation("sweep.spec.parallelism", f"must be between 1 and 64, got {parallelism}"))
    budget_s = spec.worker_time_budget.ToTimedelta().total_seconds()
    if budget_s < 0:
        bad.append(FieldViolation("sweep.spec.worker_time_budget", "must not be negative"))
    if spec.min_evaluations < 0:
        bad.append(FieldViolation("sweep.spec.min_evaluations", "must not be negative"))
    if spec.reduction_factor and spec.reduction_factor < 2:
        bad.append(FieldViolation("sweep.spec.reduction_factor", "must be at least 2"))
    return max_trials, parallelism, budget_s


def trial_spec(base: job_spec_pb2.JobSpec, params: dict[str, ParamValue], metric: str) -> job_spec_pb2.JobSpec:
    """The base spec with the trial's values written in; each trial keeps its best model by the objective."""
    spec = job_spec_pb2.JobSpec()
    spec.CopyFrom(base)
    for path, value in params.items():
        message, descriptor = _resolve(spec, path)
        if descriptor.type == FieldDescriptor.TYPE_ENUM:
            setattr(message, descriptor.name, descriptor.enum_type.values_by_name[str(value)].number)
        elif descriptor.type in _INTS:
            setattr(message, descriptor.name, int(value))
        elif descriptor.type in _FLOATS:
            setattr(message, descriptor.name, float(value))
        else:
            setattr(message, descriptor.name, value)
    spec.evaluation.best_metric = metric
    return spec


def make_sampler(plan: SearchPlan) -> optuna.samplers.BaseSampler:
    match plan.algorithm:
        case sweeps_pb2.SweepSpec.RANDOM:
            return optuna.samplers.RandomSampler(seed=plan.seed)
        case sweeps_pb2.SweepSpec.GRID:
            return AskTellGridSampler(plan.grid, seed=plan.seed)
        case sweeps_pb2.SweepSpec.CMA_ES:
            return optuna.samplers.CmaEsSampler(seed=plan.seed, warn_independent_sampling=False)
    # TPE: few random start-up trials, so a small sweep still gets guided points.
    startup = max(2, min(10, plan.max_trials // 3))
    return optuna.samplers.TPESampler(seed=plan.seed, n_startup_trials=startup, constant_liar=True)


def make_pruner(plan: SearchPlan) -> optuna.pruners.BasePruner:
    match plan.pruner:
        case sweeps_pb2.SweepSpec.MEDIAN:
            return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=plan.min_evaluations - 1)
        case sweeps_pb2.SweepSpec.SUCCESSIVE_HALVING:
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=plan.min_evaluations, reduction_factor=plan.reduction_factor
            )
        case sweeps_pb2.SweepSpec.HYPERBAND:
            return optuna.pruners.HyperbandPruner(
                min_resource=plan.min_evaluations, reduction_factor=plan.reduction_factor
            )
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- internals


def _resolve(message: Message, path: str) -> tuple[Message, Any]:
    """The message holding the field at path and the field's descriptor; KeyError when there is none."""
    *parents, leaf = path.split(".")
    for part in parents:
        descriptor = message.DESCRIPTOR.fields_by_name[part]
        if descriptor.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(descriptor):
            raise KeyError(part)
        message = getattr(message, part)
    return message, message.DESCRIPTOR.fields_by_name[leaf]


def _leaf(path: str) -> Any:
    """The descriptor of the scalar JobSpec field at path, or None."""
    descriptor: Any = job_spec_pb2.JobSpec.DESCRIPTOR
    *parents, leaf = path.split(".")
    for part in parents:
        found = descriptor.fields_by_name.get(part)
        if found is None or found.message_type is None or _is_repeated(found):
            return None
        descriptor = found.message_type
    found = descriptor.fields_by_name.get(leaf)
    if found is None or found.message_type is not None or _is_repeated(found):
        return None
    return found


def _is_repeated(descriptor: Any) -> bool:
    return bool(descriptor.is_repeated)


def _distribution(parameter: sweeps_pb2.Parameter, path: str) -> tuple[Distribution | None, list[FieldViolation]]:
    leaf = _leaf(parameter.field)
    if leaf is None:
        return None, [FieldViolation(f"{path}.field", f"{parameter.field!r} is not a scalar field of JobSpec")]
    domain = parameter.WhichOneof("domain")
    if domain == "float_range":
        r = parameter.float_range
        if leaf.type not in _FLOATS:
            return None, [FieldViolation(f"{path}.float_range", f"{parameter.field} is not a float field")]
        if not (math.isfinite(r.min) and math.isfinite(r.max) and r.min < r.max) or (r.log and r.min <= 0):
            return None, [FieldViolation(f"{path}.float_range", "needs min < max (and min > 0 with log)")]
        return optuna.distributions.FloatDistribution(r.min, r.max, log=r.log), []
    if domain == "int_range":
        i = parameter.int_range
        if leaf.type not in _INTS:
            return None, [FieldViolation(f"{path}.int_range", f"{parameter.field} is not an integer field")]
        step = i.step or 1
        if i.min > i.max or step < 1 or (i.log and (i.min <= 0 or step != 1)):
            return None, [FieldViolation(f"{path}.int_range", "needs min <= max, step >= 1 (log: min > 0, step 1)")]
        return optuna.distributions.IntDistribution(i.min, i.max, log=i.log, step=step), []
    if domain == "categorical":
        choices, problems = _choices(parameter.categorical, leaf, f"{path}.categorical")
        if problems:
            return None, problems
        return optuna.distributions.CategoricalDistribution(choices), []
    return None, [FieldViolation(path, "needs a domain: float_range, int_range or categorical")]


def _choices(
    categorical: sweeps_pb2.Categorical, leaf: Any, path: str
) -> tuple[list[ParamValue], list[FieldViolation]]:
    if not categorical.values:
        return [], [FieldViolation(f"{path}.values", "at least one value")]
    choices: list[ParamValue] = []
    for index, value in enumerate(categorical.values):
        kind = value.WhichOneof("kind")
        where = f"{path}.values[{index}]"
        if leaf.type == FieldDescriptor.TYPE_ENUM:
            names = [v.name for v in leaf.enum_type.values if v.number != 0]
            if kind != "string_value" or value.string_value not in names:
                return [], [FieldViolation(where, f"must be one of {', '.join(names)}")]
            choices.append(value.string_value)
        elif leaf.type == FieldDescriptor.TYPE_BOOL and kind == "bool_value":
            choices.append(value.bool_value)
        elif leaf.type in _INTS and kind == "number_value" and float(value.number_value).is_integer():
            choices.append(int(value.number_value))
        elif leaf.type in _FLOATS and kind == "number_value":
            choices.append(value.number_value)
        elif leaf.type == FieldDescriptor.TYPE_STRING and kind == "string_value":
            choices.append(value.string_value)
        else:
            return [], [FieldViolation(where, f"does not fit the field's type ({kind})")]
    if len(set(choices)) != len(choices):
        return [], [FieldViolation(f"{path}.values", "values must be distinct")]
    return choices, []


def _grid(distributions: dict[str, Distribution], bad: list[FieldViolation]) -> dict[str, list[Any]]:
    """Every grid point's values per parameter, once the grid's size (counted, not built) is within the cap."""
    sizes: dict[str, int] = {}
    for name, distribution in distributions.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            sizes[name] = len(distribution.choices)
        elif isinstance(distribution, optuna.distributions.IntDistribution) and not distribution.log:
            sizes[name] = (distribution.high - distribution.low) // distribution.step + 1
    if len(sizes) != len(distributions):
        bad.append(FieldViolation("sweep.spec.algorithm", "GRID needs categorical or stepped int parameters only"))
        return {}
    points = math.prod(sizes.values())
    if points > MAX_GRID_POINTS:
        counts = " x ".join(f"{name} {size:,}" for name, size in sizes.items())
        bad.append(
            FieldViolation(
                "sweep.spec.parameters",
                f"the grid has {points:,} points ({counts}), more than the limit of {MAX_GRID_POINTS:,}; "
                "use fewer values or a larger step, or RANDOM or TPE to sample the ranges",
            )
        )
    if bad:
        return {}
    grid: dict[str, list[Any]] = {}
    for name, distribution in distributions.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            grid[name] = list(distribution.choices)
        elif isinstance(distribution, optuna.distributions.IntDistribution):
            grid[name] = list(range(distribution.low, distribution.high + 1, distribution.step))
    return grid


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler stops the study once the grid is used up, which raises under ask/tell (`Study.stop` is
    for `optimize`); the sweep controller ends the sweep itself when `max_trials` (at most the grid) have run."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def _probe(
    spec: sweeps_pb2.SweepSpec, distributions: dict[str, Distribution], model_roots: list[Path], base_fields: set[str]
) -> list[FieldViolation]:
    """Each parameter at the ends of its domain (every choice of a categorical) must make a valid job. Only what
    the point itself breaks counts (the base's own problems are reported once, as the base's), so a parameter's
    range is checked even when something else in the sweep is wrong too."""
    index_of: dict[str, int] = {}
    for index, parameter in enumerate(spec.parameters):
        index_of.setdefault(parameter.field, index)
    problems: list[FieldViolation] = []
    base = spec.base
    for name, distribution in distributions.items():
        points: list[Any]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            points = list(distribution.choices)
        else:
            points = [distribution.low, distribution.high]  # type: ignore[attr-defined]
        for point in points:
            result = validate_spec(trial_spec(base, {name: point}, base.evaluation.best_metric), model_roots)
            new = [v for v in result.violations if v.field not in base_fields]
            if new:
                where = f"sweep.spec.parameters[{index_of[name]}]"
                problems.append(FieldViolation(where, f"{name}={point!r}: {new[0].description}"))
    return problems
