"""Every artifact carries its lineage: a manifest whose digests verify, naming the data, the resolved spec, the base
model and the versions that made it; a changed file is caught."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from tests.core.test_training_core import make_spec, run
from tuneforge.clients.artifacts import read_member, verify_artifact
from tuneforge.workers.core.lineage import folder_digest
from tuneforge.workers.messages import Outcome


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, keyword_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("lineage")
    finished, _ = run(make_spec(tiny_bert), keyword_dataset, work)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    return work


def test_the_manifest_names_everything_and_its_digests_verify(
    trained: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    archive = trained / "artifact.tar"
    verification = verify_artifact(archive)
    assert verification.ok, verification
    manifest = json.loads(read_member(archive, "manifest.json"))
    assert {"model.safetensors", "config.json", "metrics.json", "job_spec.json"} <= set(manifest["files"])
    assert manifest["training_file"]["sha256"] == hashlib.sha256(keyword_dataset.read_bytes()).hexdigest()
    assert manifest["spec"]["base_model"] == str(tiny_bert)
    assert manifest["base_model"] == {
        "source": "local",
        "path": str(tiny_bert.resolve()),
        "sha256": folder_digest(tiny_bert)[0],
        "files": len(list(p for p in tiny_bert.rglob("*") if p.is_file())),
    }
    assert {"python", "torch", "transformers", "tuneforge"} <= set(manifest["versions"])
    assert manifest["job"] == "jobs/job-1" and manifest["attempt"] == 1


def test_a_changed_file_fails_verification(trained: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "unpacked"
    with tarfile.open(trained / "artifact.tar") as tar:
        tar.extractall(unpacked, filter="data")
    (unpacked / "metrics.json").write_text("{}")
    (unpacked / "extra.txt").write_text("not listed")
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(tampered, "w") as tar:
        for path in sorted(p for p in unpacked.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(unpacked)))
    result = verify_artifact(tampered)
    assert not result.ok
    assert result.mismatched == ["metrics.json"] and result.unlisted == ["extra.txt"]
