"""Processed media are kept within a budget, and made ahead on threads only when examples are slow enough for
threads to pay."""

from __future__ import annotations

import threading

import pytest
import torch

from tuneforge.workers.core import processed_cache
from tuneforge.workers.core.processed_cache import ProcessedCache


def filled(count: int, threads: int, budget: int | None = None) -> tuple[ProcessedCache, list[str], int]:
    ran_on: list[str] = []

    def process(index: int) -> dict[str, torch.Tensor]:
        ran_on.append(threading.current_thread().name)
        return {"x": torch.full((4,), float(index))}

    cache = ProcessedCache(budget)
    kept = cache.fill(count, process, threads, lambda: True)
    return cache, ran_on, kept


def test_fast_examples_stay_on_this_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processed_cache, "THREADED_FROM_S", 1e9)
    cache, ran_on, kept = filled(40, threads=4)
    assert kept == 40 and set(ran_on) == {threading.current_thread().name}
    assert [float(cache.get(i)["x"][0]) for i in range(40)] == list(range(40))  # type: ignore[index]


def test_slow_examples_go_to_threads_after_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processed_cache, "THREADED_FROM_S", 0.0)
    cache, ran_on, kept = filled(40, threads=3)
    assert kept == 40
    assert ran_on[: processed_cache.PROBE_EXAMPLES] == [threading.current_thread().name] * 16
    assert any(name.startswith("decode") for name in ran_on[16:])
    assert all(float(cache.get(i)["x"][0]) == i for i in range(40))  # type: ignore[index]


@pytest.mark.parametrize("threshold", [0.0, 1e9])
def test_the_budget_stops_keeping(monkeypatch: pytest.MonkeyPatch, threshold: float) -> None:
    monkeypatch.setattr(processed_cache, "THREADED_FROM_S", threshold)
    cache, _, kept = filled(40, threads=2, budget=16 * 20)  # 16 bytes an example: room for 20
    assert kept == 20 and cache.nbytes == 320 and cache.get(20) is None
