"""The evaluation report in every artifact: a self-contained HTML page whose numbers match metrics.json, and whose
four figures (loss, validation metrics, confusion matrix, reliability) headless Chromium renders, each checked on its
own against the same page without it."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.core.test_training_core import FAST, make_spec, run
from tuneforge.workers.messages import Outcome
from tuneforge.workers.spec import EvaluationSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


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


Pixel = tuple[int, int, int]
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours
MARKS: dict[str, dict[str, int]] = {
    # per figure, the least of each mark it must show (measured: about 3x these; an empty figure shows 0 of each)
    "loss-curve": {"blue line": 500},
    "metric-curves": {"blue line": 150, "orange line": 300},
    "confusion-matrix": {"blue fill": 5000},
    "reliability": {"blue fill": 5000, "blue line": 500},
}


def marks(image: Image.Image) -> dict[str, int]:
    def near(pixel: Pixel, colour: Pixel) -> bool:
        return all(abs(a - b) <= 40 for a, b in zip(pixel, colour, strict=True))

    pixels: list[Pixel] = list(image.convert("RGB").get_flattened_data())  # type: ignore[arg-type]
    return {
        "blue line": sum(near(p, BLUE) for p in pixels),
        "orange line": sum(near(p, ORANGE) for p in pixels),
        "blue fill": sum(1 for r, g, b in pixels if b > 100 and b - r > 60),
    }


def screenshot(page: Path, size: str) -> Image.Image:
    assert CHROMIUM is not None
    shot = page.with_suffix(".png")
    command = [CHROMIUM, *HEADLESS, f"--window-size={size}", f"--screenshot={shot}", page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    return Image.open(shot)


CELL = 1000
"""Each figure alone in its own 1000-pixel square of one page (one Chromium start renders all four)."""


def figures_apart(style: str, figures: list[str], folder: Path, name: str) -> list[Image.Image]:
    """The figures, each in its own square, rendered once; the squares cut out of the screenshot."""
    cells = "".join(
        f'<div style="position:absolute; left:0; top:{i * CELL}px; width:{CELL}px; height:{CELL}px; '
        f'overflow:hidden">{figure}</div>'
        for i, figure in enumerate(figures)
    )
    html = folder / f"{name}.html"
    html.write_text(f"<!DOCTYPE html><html><head>{style}</head><body>{cells}</body></html>")
    image = screenshot(html, f"{CELL},{CELL * len(figures)}").convert("RGB")
    return [image.crop((0, i * CELL, CELL, (i + 1) * CELL)) for i in range(len(figures))]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package `chromium`; make test installs it)")
def test_headless_chromium_renders_each_figure(report: Path, tmp_path: Path) -> None:
    """Each figure alone, with the report's style, rendered by Chromium: it must show its own marks, and the same
    figure with its SVG taken out must not (so the thresholds are not met by captions and frames). The whole report
    then renders with the marks of all four together."""
    page = (report / "report.html").read_text()
    style = re.search(r"<style>.*?</style>", page, re.S)
    assert style is not None
    elements = [re.search(rf'<figure id="{figure}">.*?</figure>', page, re.S) for figure in MARKS]
    assert all(elements), [figure for figure, element in zip(MARKS, elements, strict=True) if element is None]
    drawn = [element[0] for element in elements if element is not None]
    blank = [re.sub(r"<svg.*?</svg>", "", figure, flags=re.S) for figure in drawn]
    found = {}
    for figure, shown, empty in zip(
        MARKS,
        figures_apart(style[0], drawn, tmp_path, "drawn"),
        figures_apart(style[0], blank, tmp_path, "blank"),
        strict=True,
    ):
        least, seen, without = MARKS[figure], marks(shown), marks(empty)
        assert all(seen[mark] >= count for mark, count in least.items()), (figure, seen, least)
        assert all(without[mark] < count // 10 for mark, count in least.items()), (figure, "blank", without)
        found[figure] = seen
    whole = marks(screenshot(report / "report.html", "1000,4000"))
    for mark in ("blue line", "orange line", "blue fill"):
        assert whole[mark] >= 0.9 * sum(seen[mark] for seen in found.values()), (mark, whole, found)
