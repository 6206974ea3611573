"""What a Predict call may carry: 1 to 64 inputs, each of the job's modality, within size limits."""

from __future__ import annotations

import re

from tuneforge.server.errors import FieldViolation, invalid_argument
from tuneforge.server.spec_validation import task_of
from tuneforge.v1 import job_spec_pb2, jobs_pb2

CHECKPOINT = re.compile(r"latest|step-\d{6}")
MAX_INPUTS = 64
MAX_TEXT_CHARS = 100_000


def check_predict_inputs(request: jobs_pb2.PredictRequest, spec: job_spec_pb2.JobSpec) -> list[tuple[str, str | bytes]]:
    """The inputs as (kind, value) pairs (the kind the job's task takes); INVALID_ARGUMENT naming every input of the
    wrong kind."""
    task = task_of(spec)
    if task is None:
        raise ValueError(f"a stored job has no known task ({spec.task})")
    wanted = task.modality
    violations = []
    if not 1 <= len(request.inputs) <= MAX_INPUTS:
        violations.append(FieldViolation("inputs", f"give 1 to {MAX_INPUTS} inputs, got {len(request.inputs)}"))
    if request.checkpoint and not CHECKPOINT.fullmatch(request.checkpoint):
        violations.append(FieldViolation("checkpoint", f"`latest` or `step-N`, got {request.checkpoint!r}"))
    if request.top_k < 0:
        violations.append(FieldViolation("top_k", f"must not be negative, got {request.top_k}"))
    inputs: list[tuple[str, str | bytes]] = []
    for index, item in enumerate(request.inputs):
        kind = item.WhichOneof("content")
        value: str | bytes = getattr(item, kind) if kind else b""
        if kind != wanted:
            violations.append(FieldViolation(f"inputs[{index}]", f"this job's model takes {wanted}, not {kind}"))
        elif not value:
            violations.append(FieldViolation(f"inputs[{index}]", f"the {wanted} is empty"))
        elif isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            violations.append(FieldViolation(f"inputs[{index}]", f"longer than {MAX_TEXT_CHARS} characters"))
        inputs.append((wanted, value))
    if violations:
        raise invalid_argument(violations)
    return inputs
