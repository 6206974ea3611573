"""Under CI a skip fails the run, except for tests marked needs_gpu; elsewhere a skip stays a skip."""

from __future__ import annotations

import pytest

SKIPPING = """
import pytest

def test_needs_a_package():
    pytest.skip("needs Chromium")

@pytest.mark.needs_gpu
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_on_cuda():
    pass

def test_runs():
    pass
"""


def test_a_skip_under_ci_fails_unless_it_needs_a_gpu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(SKIPPING)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "tests.ci_skips", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skipped under CI, which can run this test: Skipped: needs Chromium*"])


def test_outside_ci_a_skip_is_a_skip(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(SKIPPING)
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest("-p", "tests.ci_skips", "-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=2)
