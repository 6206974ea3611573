"""How a worker's evaluation changes the stored job: latest metrics always, best metrics only when eval_loss
improves (a worse later evaluation must not replace the best)."""

from __future__ import annotations

from tuneforge.server.job_states import JobState
from tuneforge.server.records import JobRecord
from tuneforge.server.worker_reports import report_change
from tuneforge.workers.messages import EvaluationDone


def evaluated(record: JobRecord, step: int, loss: float, accuracy: float) -> JobRecord:
    event = EvaluationDone(
        "w0", record.id, 1, step=step, epoch=step, metrics={"eval_loss": loss, "eval_accuracy": accuracy}
    )
    change = report_change(record, event)
    assert change is not None and len(change.events) == 1
    return change.record


def test_best_metrics_follow_the_lowest_eval_loss_and_latest_the_newest() -> None:
    record = JobRecord(id="j", display_name="", spec=b"", priority=0, state=JobState.RUNNING, create_time=0.0,
                       update_time=0.0, attempt=1, latest_metrics={"loss": 0.9})  # fmt: skip
    record = evaluated(record, 1, 0.5, 0.7)
    assert record.best_metrics == {"eval_loss": 0.5, "eval_accuracy": 0.7}
    record = evaluated(record, 2, 0.3, 0.8)
    record = evaluated(record, 3, 0.6, 0.9)  # worse loss, better accuracy: the best stays at step 2
    assert record.best_metrics == {"eval_loss": 0.3, "eval_accuracy": 0.8}
    assert record.latest_metrics == {"loss": 0.9, "eval_loss": 0.6, "eval_accuracy": 0.9}
