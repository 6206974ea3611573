"""A pytest plugin: under CI (the `CI` variable set), a skipped test is a failure unless it is marked
`needs_gpu` (CI's machine has no GPU). A skip must not hide a test CI can run: a missing system package or a
missing privilege there is a broken CI, not a reason to pass."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_gpu: needs a CUDA device (the only skip CI accepts)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get("CI") or not report.skipped or item.get_closest_marker("needs_gpu") is not None:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI, which can run this test: {reason}"
