"""Live rendering of a job's event stream: a progress bar with loss, accuracy and samples/s, and log lines above."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneforge.v1 import jobs_pb2

STATE = jobs_pb2.Job.State


def describe_event(event: jobs_pb2.JobEvent) -> str | None:
    """One line for events that deserve a line of their own (not the frequent training metrics)."""
    kind = event.WhichOneof("payload")
    if kind == "state_change":
        change = event.state_change
        line = f"state {STATE.Name(change.to_state)}"
        if change.HasField("error"):
            line += f": {change.error.reason}: {change.error.message}"
        return line
    if kind == "evaluation_metrics":
        metrics = event.evaluation_metrics
        values = ", ".join(f"{k.removeprefix('eval_')}={v:.4f}" for k, v in sorted(metrics.metrics.items()))
        return f"eval at step {metrics.step} (epoch {metrics.epoch}): {values}"
    if kind == "log":
        return f"[{jobs_pb2.LogLine.Severity.Name(event.log.severity).lower()}] {event.log.message}"
    if kind == "checkpoint_saved":
        return f"checkpoint at step {event.checkpoint_saved.step} ({event.checkpoint_saved.size_bytes:,} bytes)"
    if kind == "artifact_ready":
        artifact = event.artifact_ready.artifact
        return f"artifact ready: {artifact.size_bytes:,} bytes, sha256 {artifact.sha256[:12]}"
    return None


def render_watch(events: Iterable[jobs_pb2.JobEvent], console: Console) -> int | None:
    """Shows the stream until it ends; returns the final state (None if the stream ended without one)."""
    final: int | None = None
    accuracy = "-"  # until the first evaluation
    with Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("training", total=None, stats="")
        for event in events:
            kind = event.WhichOneof("payload")
            if kind == "training_metrics":
                m = event.training_metrics
                progress.update(
                    bar,
                    total=m.total_steps,
                    completed=m.step,
                    description=f"epoch {m.epoch}",
                    stats=f"loss {m.loss:.4f}  acc {accuracy}  {m.samples_per_second:.1f} samples/s",
                )
                continue
            if kind == "evaluation_metrics":
                value = event.evaluation_metrics.metrics.get("eval_accuracy")
                accuracy = f"{value:.3f}" if value is not None else accuracy
            if kind == "state_change":
                final = event.state_change.to_state
            line = describe_event(event)
            if line:
                progress.console.print(f"#{event.sequence} {line}")  # consoles here never read markup
    return final
