"""Log lines as text or JSON, the same in the server and the workers, each job line carrying its job and attempt.

The job comes from the context (`job_context`, set around the code that works on one job) or from `extra` (a line
about a job written elsewhere, such as the scheduler's). JSON is one object per line for log pipelines (Loki, Cloud
Logging, Elasticsearch); text is for people.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("text", "json")
INTERNAL_MARK = "job_event_sent"
"""Set (as `extra`) on lines that were already sent as job events, so they are not forwarded twice; never shown."""
_JOB: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("tuneforge_job", default=None)


@contextlib.contextmanager
def job_context(job: str, attempt: int) -> Iterator[None]:
    """Lines logged inside (in this thread or task) belong to this job attempt."""
    token = _JOB.set((job, attempt))
    try:
        yield
    finally:
        _JOB.reset(token)


def current_job() -> tuple[str, int] | None:
    return _JOB.get()


def job_fields(job: str, attempt: int) -> dict[str, Any]:
    """`extra=` for a line about a job logged outside its context."""
    return {"job": job, "attempt": attempt}


class JobFields(logging.Filter):
    """Stamps records with the process's role and, on job lines, the job and attempt."""

    def __init__(self, process_name: str):
        super().__init__()
        self._process_name = process_name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self._process_name
        if not getattr(record, "job", ""):
            context = _JOB.get()
            if context is not None:
                record.job, record.attempt = context
        return True


class TextFormatter(logging.Formatter):
    """`time role LEVEL logger: message [job attempt N]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(process_name)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job", "")
        if not job:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} [{job} attempt {getattr(record, 'attempt', 0)}]{newline}{rest}"


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger", "process_name": "process"},
            timestamp="time",
            reserved_attrs=[*RESERVED_ATTRS, INTERNAL_MARK],
        )
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")


def configure_logging(level: str | int, log_format: str, process_name: str) -> None:
    """One stderr handler on the root logger, replacing any earlier setup (a spawned worker starts blank)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFields(process_name))
    handler.setFormatter(make_formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
