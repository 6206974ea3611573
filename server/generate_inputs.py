"""What a Generate call may carry: a prompt or chat messages within size limits, and bounded decoding settings."""

from __future__ import annotations

import math

from tuneforge.server.errors import FieldViolation, failed_precondition, invalid_argument
from tuneforge.server.predict_inputs import CHECKPOINT, MAX_TEXT_CHARS
from tuneforge.server.spec_validation import task_of
from tuneforge.v1 import job_spec_pb2, jobs_pb2
from tuneforge.workers.messages import GenerationRequest

DEFAULT_NEW_TOKENS = 128
MAX_NEW_TOKENS = 1024
MAX_MESSAGES = 200
MAX_TEMPERATURE = 2.0
MAX_STOPS = 4
MAX_STOP_CHARS = 64
ROLES = ("system", "user", "assistant")


def check_generate_request(request: jobs_pb2.GenerateRequest, spec: job_spec_pb2.JobSpec) -> GenerationRequest:
    """The call as the worker takes it; FAILED_PRECONDITION for a job whose task does not generate, INVALID_ARGUMENT
    naming every bad field."""
    task = task_of(spec)
    if task is None or not task.generates:
        raise failed_precondition(
            "NOT_GENERATIVE",
            f"{request.name} is a {task.enum_name if task else 'unknown'} job; Generate serves generative tasks "
            "(TEXT_GENERATION); use Predict",
        )
    violations = []
    if request.checkpoint and not CHECKPOINT.fullmatch(request.checkpoint):
        violations.append(FieldViolation("checkpoint", f"`latest` or `step-N`, got {request.checkpoint!r}"))
    if bool(request.prompt) == bool(request.messages):
        violations.append(FieldViolation("prompt", "give exactly one of prompt and messages"))
    if len(request.prompt) > MAX_TEXT_CHARS:
        violations.append(FieldViolation("prompt", f"longer than {MAX_TEXT_CHARS} characters"))
    violations += _message_violations(request)
    if not 0 <= request.max_new_tokens <= MAX_NEW_TOKENS:
        violations.append(FieldViolation("max_new_tokens", f"0 (meaning {DEFAULT_NEW_TOKENS}) to {MAX_NEW_TOKENS}"))
    if not (math.isfinite(request.temperature) and 0 <= request.temperature <= MAX_TEMPERATURE):
        violations.append(FieldViolation("temperature", f"0 (greedy) to {MAX_TEMPERATURE}"))
    if not (math.isfinite(request.top_p) and 0 <= request.top_p <= 1):
        violations.append(FieldViolation("top_p", "0 to 1 (0 or 1: off)"))
    if len(request.stop) > MAX_STOPS:
        violations.append(FieldViolation("stop", f"at most {MAX_STOPS} strings"))
    for index, stop in enumerate(request.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            violations.append(FieldViolation(f"stop[{index}]", f"1 to {MAX_STOP_CHARS} characters"))
    if violations:
        raise invalid_argument(violations)
    return GenerationRequest(
        prompt=request.prompt,
        messages=tuple((message.role, message.content) for message in request.messages),
        max_new_tokens=request.max_new_tokens or DEFAULT_NEW_TOKENS,
        temperature=request.temperature,
        top_p=request.top_p or 1.0,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
    )


def _message_violations(request: jobs_pb2.GenerateRequest) -> list[FieldViolation]:
    violations = []
    if len(request.messages) > MAX_MESSAGES:
        violations.append(FieldViolation("messages", f"at most {MAX_MESSAGES} messages"))
    if sum(len(message.content) for message in request.messages) > MAX_TEXT_CHARS:
        violations.append(FieldViolation("messages", f"longer than {MAX_TEXT_CHARS} characters in all"))
    for index, message in enumerate(request.messages[:MAX_MESSAGES]):
        if message.role not in ROLES:
            violations.append(FieldViolation(f"messages[{index}].role", f"one of {', '.join(ROLES)}"))
    if request.messages and request.messages[-1].role == "assistant":
        violations.append(FieldViolation("messages", "the last message is the user's (or system's): it is answered"))
    return violations
