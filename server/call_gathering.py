"""The batching window Predict and Generate share: calls for the same model from the same tenant that arrive within
GATHER_S of the first, or that fill a batch, are handed over together to be sent to one worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

C = TypeVar("C")
GATHER_S = 0.01
"""How long the first call of a batch waits for others to join it."""
ModelKey = tuple[str, str, str]
"""(job, the model within it: artifact digest or `checkpoint:NAME`, tenant): a batch is one tenant's, for one model."""


@dataclass
class Gathered(Generic[C]):
    """Calls for one model waiting to be sent together."""

    artifact: str
    checkpoint: str
    tenant: str
    calls: list[C] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class CallGatherer(Generic[C]):
    """Holds calls per model until the window closes or `capacity` (counted in each call's size) is reached, then
    gives them to `send(key, gathered)`."""

    def __init__(self, capacity: int, send: Callable[[ModelKey, Gathered[C]], None]):
        self._capacity = capacity
        self._send = send
        self._waiting: dict[ModelKey, Gathered[C]] = {}

    def add(self, key: ModelKey, artifact: str, checkpoint: str, call: C, size: int) -> None:
        gathered = self._waiting.setdefault(key, Gathered(artifact, checkpoint, key[2]))
        gathered.calls.append(call)
        gathered.size += size
        if gathered.size >= self._capacity:
            self._flush(key)
        elif gathered.timer is None:
            gathered.timer = asyncio.get_running_loop().call_later(GATHER_S, self._flush, key)

    def _flush(self, key: ModelKey) -> None:
        gathered = self._waiting.pop(key, None)
        if gathered is None:
            return
        if gathered.timer is not None:
            gathered.timer.cancel()
        self._send(key, gathered)


def model_key(job: str, sha256: str, checkpoint: str, tenant: str) -> ModelKey:
    return (job, f"checkpoint:{checkpoint}" if checkpoint else sha256, tenant)
