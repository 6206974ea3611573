"""`tuneforge submit` flags <-> JobSpec: one flag per common field, named as a person would say it, and the flags
each task declares for its own fields (workers/tasks/*/__init__.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from google.protobuf import json_format

from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import sweeps_pb2
from tuneforge.workers.tasks import registry
from tuneforge.workers.tasks.definition import TaskFlag, field_holder

TASKS = {task.cli_name: pb.Task.Value(task.enum_name) for task in registry.definitions().values()}
ADAPTATIONS = {
    "full": pb.Adaptation.FULL,
    "frozen-backbone": pb.Adaptation.FROZEN_BACKBONE,
    "freeze-first-blocks": pb.Adaptation.FREEZE_FIRST_BLOCKS,
    "lora": pb.Adaptation.LORA,
}
SCHEDULES = {
    "constant": pb.Schedule.CONSTANT,
    "linear": pb.Schedule.LINEAR,
    "cosine": pb.Schedule.COSINE,
    "step": pb.Schedule.STEP,
    "exponential": pb.Schedule.EXPONENTIAL,
}
OPTIMIZERS = {"adamw": pb.Hyperparameters.ADAMW, "sgd": pb.Hyperparameters.SGD}
ACTIVATIONS = {"relu": pb.HeadSpec.RELU, "gelu": pb.HeadSpec.GELU, "tanh": pb.HeadSpec.TANH}


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The submit command's flags; unset flags leave the server's defaults."""
    add = parser.add_argument
    add("--task", choices=TASKS, default="text-classification")
    add("--model", required=True, help="hub id or a model folder under a server model root")
    add("--train", required=True, help="training file name (files/ID) from `upload`")
    add("--validation", help="validation file name (files/ID)")
    add("--validation-fraction", type=float, default=0.0, help="hold out this fraction of --train instead")
    add("--label-column", default="")
    for flag, (task_flag, tasks) in task_flags().items():
        shown = f"{task_flag.help} [{', '.join(tasks)}]"
        if task_flag.type is bool:  # a switch: given or not
            add(flag, dest=_dest(task_flag), action="store_const", const=True, default=None, help=shown)
            continue
        metavar = flag.lstrip("-").replace("-", "_").upper()
        add(flag, dest=_dest(task_flag), type=task_flag.type, metavar=metavar, help=shown)
    add("--adaptation", choices=ADAPTATIONS, default="full")
    add("--frozen-blocks", type=int, default=0, help="blocks frozen by --adaptation freeze-first-blocks")
    add("--head-hidden", type=int, nargs="*", default=None, help="custom head hidden sizes, e.g. 1024")
    add("--head-activation", choices=ACTIVATIONS, default="relu")
    add("--head-dropout", type=float, default=0.0)
    add("--epochs", type=int, default=0)
    add("--batch-size", type=int, default=0)
    add("--learning-rate", type=float, default=0.0)
    add("--weight-decay", type=float)
    add("--optimizer", choices=OPTIMIZERS, default="adamw")
    add("--momentum", type=float)
    add("--schedule", choices=SCHEDULES, default="linear")
    add("--warmup-steps", type=int, default=0)
    add("--warmup-ratio", type=float, default=0.0)
    add("--step-size", type=int, default=0)
    add("--gamma", type=float, default=0.0)
    add("--max-grad-norm", type=float)
    add("--grad-accumulation", type=int, default=0)
    add("--max-steps", type=int, default=0)
    add("--seed", type=int, default=0)
    add("--eval-every", type=int, default=0, help="evaluate every N steps (default: each epoch)")
    add("--log-every", type=int, default=0)
    add("--checkpoint-every", type=int, default=0)
    add("--eval-before", action="store_true", help="evaluate the untuned model first")
    add("--compile", action="store_true", help="torch.compile the model (for long GPU jobs; compiles at the start)")
    add(
        "--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)"
    )
    add("--gpus", type=int, default=0, help="GPUs for the job; more than one trains data-parallel, one rank per GPU")
    add("--ranks", type=int, default=0, help="data-parallel ranks (default: one per GPU, or one; on CPU: gloo)")
    add("--priority", type=int, default=0)


def spec_from_arguments(args: argparse.Namespace) -> pb.JobSpec:
    """Builds the JobSpec the flags describe (the server validates and fills defaults)."""
    hp = pb.Hyperparameters(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=OPTIMIZERS[args.optimizer],
        gradient_accumulation_steps=args.grad_accumulation,
        seed=args.seed,
        max_steps=args.max_steps,
        schedule=pb.Schedule(
            kind=SCHEDULES[args.schedule],
            warmup_steps=args.warmup_steps,
            warmup_ratio=args.warmup_ratio,
            step_size=args.step_size,
            gamma=args.gamma,
        ),
    )
    for name in ("weight_decay", "momentum", "max_grad_norm"):
        if getattr(args, name) is not None:
            setattr(hp, name, getattr(args, name))
    hp.compile = args.compile
    hp.gradient_checkpointing = args.gradient_checkpointing
    spec = pb.JobSpec(
        task=TASKS[args.task],
        base_model=args.model,
        data=pb.DataSpec(
            training_file=args.train,
            validation_file=args.validation or "",
            validation_fraction=args.validation_fraction,
            label_column=args.label_column,
        ),
        adaptation=pb.Adaptation(method=ADAPTATIONS[args.adaptation], num_frozen_blocks=args.frozen_blocks),
        hyperparameters=hp,
        evaluation=pb.EvaluationSpec(
            eval_every_steps=args.eval_every,
            log_every_steps=args.log_every,
            checkpoint_every_steps=args.checkpoint_every,
            evaluate_before_training=args.eval_before,
        ),
        resources=pb.Resources(gpus=args.gpus, ranks=args.ranks),
        priority=args.priority,
    )
    for task_flag, _ in task_flags().values():
        value = getattr(args, _dest(task_flag))
        if value is not None:
            setattr(*field_holder(spec, task_flag.field), value)
    if args.head_hidden is not None:
        spec.head.CopyFrom(
            pb.HeadSpec(
                hidden_sizes=args.head_hidden, activation=ACTIVATIONS[args.head_activation], dropout=args.head_dropout
            )
        )
    return spec


def task_flags() -> dict[str, tuple[TaskFlag, list[str]]]:
    """Every task's own flags, each once, with the tasks (CLI names) that take it."""
    flags: dict[str, tuple[TaskFlag, list[str]]] = {}
    for task in registry.definitions().values():
        for flag in task.flags:
            known = flags.setdefault(flag.flag, (flag, []))
            if known[0] != flag:
                raise TypeError(f"{task.name} declares {flag.flag} unlike another task: share one TaskFlag")
            known[1].append(task.cli_name)
    return flags


def _dest(flag: TaskFlag) -> str:
    return "task_" + flag.field.replace(".", "_")


def load_spec_file(path: Path) -> pb.JobSpec:
    """A JobSpec from its protobuf JSON form (camelCase or snake_case field names, enum names as strings)."""
    return json_format.Parse(path.read_text(), pb.JobSpec())


def load_sweep_file(path: Path) -> sweeps_pb2.SweepSpec:
    """A SweepSpec from its protobuf JSON form (see examples/sweeps/)."""
    return json_format.Parse(path.read_text(), sweeps_pb2.SweepSpec())


def add_spec_file_arguments(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """The flags of a create-from-file command: the spec file, its data files, name, idempotency key, watch."""
    parser.add_argument("--spec", required=True, help=f"{what} in protobuf JSON (see {example})")
    parser.add_argument("--train", required=True, help="training file name (files/ID)")
    parser.add_argument("--validation", help="validation file name (files/ID); replaces the spec's fraction")
    parser.add_argument("--name", default="", help="display name")
    parser.add_argument("--request-id", help="idempotency key (a UUID); default: a new one")
    parser.add_argument("--watch", action="store_true", help="watch it after creating it")


def set_data_files(data: pb.DataSpec, args: argparse.Namespace) -> None:
    """Writes --train and --validation into a spec read from a file (a validation file replaces its fraction)."""
    data.training_file = args.train
    if args.validation:
        data.validation_file = args.validation
        data.validation_fraction = 0.0
