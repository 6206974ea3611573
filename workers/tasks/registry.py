"""Every task package under `workers/tasks/`, found on first use: adding a task is adding its package.

Only the light definitions are imported here; a task's runtime (torch) is imported when a worker first asks for it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING

from tuneforge.workers.tasks.definition import TASK_FIELDS, TaskDefinition

if TYPE_CHECKING:
    from tuneforge.workers.tasks.runtime import TaskRuntime

PACKAGE = __name__.rpartition(".")[0]


class UnknownTask(LookupError):
    """No task package has this name."""


@functools.cache
def definitions() -> dict[str, TaskDefinition]:
    """Every task by name, in name order."""
    package = importlib.import_module(PACKAGE)
    found: dict[str, TaskDefinition] = {}
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not module.ispkg:
            continue
        definition = getattr(importlib.import_module(f"{PACKAGE}.{module.name}"), "DEFINITION", None)
        if not isinstance(definition, TaskDefinition) or definition.name != module.name:
            raise TypeError(f"{PACKAGE}.{module.name} must define DEFINITION = TaskDefinition(name={module.name!r})")
        unknown = definition.reads - set(TASK_FIELDS)
        if unknown:
            raise TypeError(f"{module.name} reads fields no task-field rule covers: {sorted(unknown)}")
        found[module.name] = definition
    return found


def definition(name: str) -> TaskDefinition:
    try:
        return definitions()[name]
    except KeyError:
        raise UnknownTask(f"no task {name!r}; tasks: {', '.join(definitions())}") from None


def by_enum_name(enum_name: str) -> TaskDefinition | None:
    """The task a proto `Task` enum value names (None for TASK_UNSPECIFIED or a value no package defines)."""
    return definitions().get(enum_name.lower()) if enum_name.isupper() else None


def readers(field: str) -> list[TaskDefinition]:
    """The tasks that read a task-specific field."""
    return [task for task in definitions().values() if field in task.reads]


@functools.cache
def runtime(name: str) -> TaskRuntime:
    """The task's torch side (its package's `runtime.RUNTIME`), imported on first use."""
    definition(name)
    found: TaskRuntime = importlib.import_module(f"{PACKAGE}.{name}.runtime").RUNTIME
    return found
