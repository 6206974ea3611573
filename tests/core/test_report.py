"""The evaluation report in every artifact: a self-contained HTML page that headless Chromium renders with its
curves, confusion matrix and calibration, and whose figures match metrics.json."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.core.test_training_core import FAST, make_spec, run
from workers.messages import Outcome
from workers.spec import EvaluationSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,3600"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, keyword_dataset: Path) -> Path:
    work = tmp_path_factory.mktemp("report")
    hyperparameters = dataclasses.replace(FAST, epochs=4)
    spec = make_spec(tiny_bert, hyperparameters=hyperparameters, evaluation=EvaluationSettings(log_every_steps=2))
    finished, _ = run(spec, keyword_dataset, work)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    with tarfile.open(work / "artifact.tar") as tar:
        tar.extractall(work / "model", filter="data")
    return work / "model"


def test_the_report_holds_the_figures_of_metrics_json(report: Path) -> None:
    page = (report / "report.html").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert not any(tag in page for tag in ("<script", "<link", 'src="', 'href="http'))  # self-contained
    for name in metrics["classes"]["labels"]:
        assert f"<td>{name}</td>" in page
    assert f"{metrics['classes']['calibration']['ece']:.4f}" in page
    assert f"{metrics['baseline']['eval_accuracy']:.4f}" in page and f"{metrics['best']['eval_accuracy']:.4f}" in page
    assert metrics["best"]["eval_accuracy"] > metrics["baseline"]["eval_accuracy"]  # tuning beat the untuned head
    assert len(metrics["train_history"]) == metrics["steps"] // 2


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package `chromium`; make test installs it)")
def test_headless_chromium_renders_the_curves_and_the_matrix(report: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    url = (report / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *HEADLESS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for figure in ("loss-curve", "metric-curves", "confusion-matrix", "reliability"):
        start = dom.stdout.index(f'<figure id="{figure}">')
        assert "<svg" in dom.stdout[start : start + 400], figure
    shot = tmp_path / "report.png"
    result = subprocess.run([CHROMIUM, *HEADLESS, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    pixels = list(image.getdata())
    inked = sum(1 for r, g, b in pixels if min(r, g, b) < 200) / len(pixels)
    blues = sum(1 for r, g, b in pixels if b > 150 and b - r > 60)  # the curves' and the matrix's blues
    assert image.size == (1280, 3600)
    assert inked > 0.02, f"the page looks blank ({inked:.3%} inked)"
    assert blues > 2000, blues
