"""The Ray pool's cluster tests, run inside a network namespace with only loopback (created here), so that
nothing Ray starts binds or connects beyond 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import can_make_namespaces, loopback_namespace
from tests.ray_inner.conftest import INSIDE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_ray_cluster_tests_pass_in_a_loopback_namespace(tmp_path: Path) -> None:
    missing = can_make_namespaces()
    assert not missing, missing
    with loopback_namespace() as namespace:
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["--basetemp", str(tmp_path / "inner"), "tests/ray_inner"]
        result = subprocess.run(
            command, cwd=REPO, env={**os.environ, INSIDE: "1"}, capture_output=True, text=True, timeout=480
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout, result.stdout[-3000:]
