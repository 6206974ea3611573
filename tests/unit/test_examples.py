"""Every job spec in examples/ parses and passes the server's validation once its data files are filled in."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.clients.spec_flags import load_spec_file, load_sweep_file
from tuneforge.server.search_space import plan_search
from tuneforge.server.spec_validation import validate_spec
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.workers.tasks import registry

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))


def test_there_is_an_example_per_task() -> None:
    tasks = {pb.Task.Name(load_spec_file(path).task).lower() for path in EXAMPLES}
    assert tasks == set(registry.definitions())


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_a_valid_job(path: Path) -> None:
    spec = load_spec_file(path)
    spec.data.training_file = "files/file-abc"
    result = validate_spec(spec, [])
    assert not result.violations, result
    assert result.spec is not None and "/" in result.spec.base_model  # a hub id


SWEEPS = sorted((Path(__file__).resolve().parents[2] / "examples" / "sweeps").glob("*.json"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_example_is_a_valid_sweep(path: Path) -> None:
    spec = load_sweep_file(path)
    spec.base.data.training_file = "files/file-abc"
    plan, violations = plan_search(spec, [])
    assert plan is not None and not violations, violations
    assert len(plan.distributions) >= 2
