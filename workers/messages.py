"""The typed message catalogue that crosses the server/worker boundary.

Commands go from the server to one worker; events come back. Every message is a frozen, picklable dataclass, so
the same catalogue serves a spawned local process and a Ray actor alike. Workers only report what
happened: the server alone decides job states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tuneforge.workers.spec import TrainingSpec

# ---------------------------------------------------------------- commands: server -> worker


@dataclass(frozen=True)
class DataFile:
    """A stored file the worker reads: where it lies and the client's name for it (the extension tells the format)."""

    path: str
    filename: str


@dataclass(frozen=True)
class RunJob:
    """Train one job attempt and write its artifact."""

    job: str
    attempt: int
    spec: TrainingSpec
    training_data: DataFile
    validation_data: DataFile | None
    work_dir: str
    """Scratch space for this attempt (unpacked data, the model folder before packing)."""
    checkpoint_dir: str
    """The job's checkpoints, shared by its attempts: a new attempt resumes from the newest one."""
    artifact_path: str
    """Where the finished tar archive goes (written atomically)."""
    time_limit_s: float = 0.0
    """Running time this attempt may use before max_runtime runs out; 0 means no limit."""
    max_unpacked_bytes: int = 0
    """The most the job's data archives may unpack to (its tenant's storage quota); 0: the worker's own cap."""


@dataclass(frozen=True)
class CancelJob:
    """Stop the given job attempt at the next step boundary."""

    job: str
    attempt: int
    checkpoint_first: bool = False
    """Pause rather than cancel: save a checkpoint to resume from, then stop (outcome PAUSED)."""


@dataclass(frozen=True)
class Shutdown:
    """Finish (or abandon) the current job and exit."""


@dataclass(frozen=True)
class PredictBatch:
    """Run a finished job's model on inputs (several callers' at once); answered by PredictionsReady."""

    batch: int
    job: str
    artifact: str
    """Where the artifact lies (a path, or an object-storage URL)."""
    artifact_sha256: str
    inputs: list[tuple[str, str | bytes]]
    """(kind, value): ("text", str), ("image", bytes) or ("audio", bytes)."""
    top_k: int
    checkpoint: str = ""
    """`latest` or `step-N`: a checkpoint under `artifact`, which then names the job's checkpoint folder."""
    tenant: str = ""
    """Whose calls these are: a worker serves tenants in turn."""
    deadline: float = 0.0
    """Wall-clock time (time.time()) after which every caller has given up: the worker drops the batch unworked."""


@dataclass(frozen=True)
class ExportArtifact:
    """Make and check one export of a finished job's model; answered by ExportReady."""

    request: int
    job: str
    artifact: str
    artifact_sha256: str
    format: str
    onnx_opset: int
    destination: str
    """Where the export file goes (a path or an object-storage URL); its metadata goes beside it as `.json`."""
    tenant: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    """One Generate call: a prompt to continue, or chat messages to answer, and how to write."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    """(role, content) pairs, answered as the next assistant turn; used when `prompt` is empty."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateBatch:
    """Write answers for several Generate calls together, streaming TextGenerated events; rows are the calls."""

    batch: int
    job: str
    artifact: str
    artifact_sha256: str
    requests: list[GenerationRequest]
    checkpoint: str = ""
    tenant: str = ""
    deadline: float = 0.0
    """Wall-clock time after which every caller has given up: the worker stops writing."""


@dataclass(frozen=True)
class StopGeneration:
    """Callers of a GenerateBatch went away (cancelled, or past their deadline): stop writing their rows."""

    batch: int
    rows: tuple[int, ...]


CallCommand = PredictBatch | ExportArtifact | GenerateBatch | StopGeneration
"""A call made to a worker outside any job (Predict, ExportModel, Generate)."""
WorkerCommand = RunJob | CancelJob | Shutdown | CallCommand

# ---------------------------------------------------------------- events: worker -> server


class Outcome(StrEnum):
    """How a job attempt ended, as the worker saw it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"
    """Stopped after saving a checkpoint the next attempt resumes from."""


class Severity(StrEnum):
    """Log line severity."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class WorkerReady:
    """The worker has imported its stack, chosen its device and waits for work."""

    worker: str
    pid: int
    device: str
    gpu_uuid: str = ""
    """NVML's UUID of the worker's GPU (`GPU-...`); empty on the CPU."""
    gpu_name: str = ""
    gpus: int = 0
    """GPUs this worker can give one job (its data-parallel ranks train one per GPU)."""
    host: str = ""
    """The machine the worker runs on (Ray pools spread workers over nodes)."""


@dataclass(frozen=True)
class WorkerDied:
    """The pool saw a worker process end without being asked to (made by the pool, not the worker)."""

    worker: str
    exitcode: int | None


@dataclass(frozen=True)
class JobEventBase:
    """Fields every job event carries: who sent it and for which attempt (stale attempts are ignored)."""

    worker: str
    job: str
    attempt: int


@dataclass(frozen=True)
class JobStarted(JobEventBase):
    """Training began; totals are known."""

    total_steps: int = 0
    total_epochs: int = 0


@dataclass(frozen=True)
class Heartbeat(JobEventBase):
    """The worker is alive and still on this job."""


@dataclass(frozen=True)
class TrainingProgress(JobEventBase):
    """Training metrics, every `log_every_steps` optimizer steps."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float = 0.0
    learning_rate: float = 0.0
    samples_per_second: float = 0.0
    grad_norm: float = 0.0
    window_steps: int = 0
    """Optimizer steps since the previous report (the window these figures cover)."""
    window_samples: int = 0
    window_seconds: float = 0.0


@dataclass(frozen=True)
class EvaluationDone(JobEventBase):
    """One evaluation on the validation data."""

    step: int = 0
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LogEmitted(JobEventBase):
    """A line of the training log."""

    severity: Severity = Severity.INFO
    message: str = ""


@dataclass(frozen=True)
class CheckpointWritten(JobEventBase):
    """A checkpoint was written under the attempt's work dir."""

    step: int = 0
    size_bytes: int = 0
    path: str = ""
    seconds: float = 0.0
    """Time the checkpoint took to write."""


@dataclass(frozen=True)
class ArtifactWritten(JobEventBase):
    """The artifact archive is complete at the RunJob's artifact_path."""

    size_bytes: int = 0
    sha256: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AutoChosen(JobEventBase):
    """The job chose a hyperparameter for itself: the value, why, and the measurements behind it."""

    field: str = ""
    """The spec field, e.g. `hyperparameters.learning_rate`."""
    value: float = 0.0
    reason: str = ""
    evidence: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class JobFinished(JobEventBase):
    """The attempt ended; the worker is free again."""

    outcome: Outcome = Outcome.SUCCEEDED
    reason: str = ""
    """UPPER_SNAKE reason when the outcome is FAILED."""
    message: str = ""


JobEvent = (
    JobStarted
    | Heartbeat
    | TrainingProgress
    | EvaluationDone
    | LogEmitted
    | CheckpointWritten
    | ArtifactWritten
    | AutoChosen
    | JobFinished
)


@dataclass(frozen=True)
class PredictionsReady:
    """The answers to a PredictBatch, one per input in order ({"labels": [(label, p)...]}, {"transcript": ...} or
    {"error": why}); or, with error_reason set, why the whole batch failed."""

    worker: str
    batch: int
    results: list[dict[str, Any]]
    error_reason: str = ""
    error_message: str = ""
    forward_passes: int = 0


@dataclass(frozen=True)
class ExportReady:
    """An export was made and checked (result: its metadata), or could not be (error_reason, error_message)."""

    worker: str
    request: int
    result: dict[str, Any]
    error_reason: str = ""
    error_message: str = ""


@dataclass(frozen=True)
class GeneratedPiece:
    """Text one row wrote since its last piece; `finish` ("stop" or "length") on the row's last piece."""

    row: int
    text: str
    generated_tokens: int
    finish: str = ""
    prompt_tokens: int = 0


@dataclass(frozen=True)
class TextGenerated:
    """Pieces of a GenerateBatch's answers, one step's worth; or, with error_reason set, why the batch failed."""

    worker: str
    batch: int
    pieces: tuple[GeneratedPiece, ...] = ()
    error_reason: str = ""
    error_message: str = ""


WorkerCall = PredictionsReady | ExportReady | TextGenerated
"""A worker's answer to a call made outside any job."""
WorkerEvent = WorkerReady | WorkerDied | JobEvent | WorkerCall
