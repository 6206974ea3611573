"""What every classifier runtime shares, whatever its modality: top-k answers, the plain export check and the
report's per-class, confusion-matrix and calibration sections."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jinja2

from tuneforge.workers.core.media_data import MediaDataset
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.report import figure, markup, svg
from tuneforge.workers.tasks.runtime import logits_of

if TYPE_CHECKING:
    from tuneforge.workers.core.prediction import LoadedModel

SECTIONS = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """{% if per_class %}<h2 id="classes">Per class</h2>
<table id="per-class"><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for name, row in per_class %}<tr><td>{{ name }}</td><td>{{ "%.3f"|format(row.precision) }}</td>
<td>{{ "%.3f"|format(row.recall) }}</td><td>{{ "%.3f"|format(row.f1) }}</td><td>{{ row.support }}</td></tr>
{% endfor %}</table>{% endif %}
{% if matrix_plot %}<figure id="confusion-matrix">{{ matrix_plot }}<figcaption>Confusion matrix (rows: true class,
columns: predicted)</figcaption></figure>{% endif %}
{% if calibration %}<h2 id="calibration">Calibration</h2>
<p>Expected calibration error: <strong id="ece">{{ "%.4f"|format(calibration.ece) }}</strong> (0 when the model's
confidence matches how often it is right)</p>
<figure id="reliability">{{ reliability_plot }}<figcaption>Reliability: accuracy against confidence</figcaption>
</figure>{% endif %}"""
)


class DecodedAhead(Protocol):
    """A media data set that can decode and process its examples ahead of training (see processed_cache)."""

    def process_ahead(self, threads: int) -> int: ...


def prepared_media(
    model: Any,
    processor: Any,
    data: MediaDataset,
    sets: tuple[DecodedAhead, DecodedAhead],
    collate: Callable[[list[Any]], Batch],
    what: str,
    log: Callable[[str], None],
) -> PreparedTask:
    """An image or audio classifier's PreparedTask, its (training, validation) sets decoded ahead on every core when
    nothing random happens to them; `what` names the examples in the log (`images`, `clips`)."""
    threads = os.cpu_count() or 1
    kept = sum(dataset.process_ahead(threads) for dataset in sets)
    if kept:
        log(f"decoded {kept} {what} ahead, on {threads} threads (kept in memory for every epoch)")
    train_set, validation_set = sets
    return PreparedTask(
        model=model,
        processor=processor,
        train_set=train_set,  # type: ignore[arg-type]
        validation_set=validation_set,  # type: ignore[arg-type]
        collate=collate,
        labels=data.labels,
        train_labels=[example.label for example in data.train],
    )


class ClassifierRuntime:
    """The members every classifier runtime has alike; each modality adds data, decoding and sample inputs."""

    export_tolerance = 1e-4
    export_refusals: Mapping[str, str] = {}

    def answer(self, loaded: LoadedModel, decoded: list[Any], top_k: int) -> list[dict[str, Any]]:
        probabilities = logits_of(loaded, decoded).softmax(dim=-1)
        k = min(max(1, top_k), probabilities.shape[-1])
        values, indices = probabilities.topk(k, dim=-1)
        return [
            {"labels": [(loaded.labels[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]}
            for row_p, row_i in zip(values, indices, strict=True)
        ]

    def fixed_shape_inputs(self, loaded: LoadedModel, items: list[tuple[str, Any]]) -> Batch:
        return loaded.inputs(items)

    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        classes = metrics.get("classes") or {}
        calibration = classes.get("calibration")
        return [
            SECTIONS.render(
                per_class=sorted(classes.get("per_class", {}).items()),
                matrix_plot=markup(
                    confusion_matrix(classes["confusion_matrix"], classes["labels"]) if "labels" in classes else ""
                ),
                calibration=calibration,
                reliability_plot=markup(reliability(calibration["bins"]) if calibration else ""),
            )
        ]


def confusion_matrix(matrix: list[list[int]], labels: list[str]) -> str:
    size = max(3.0, 0.6 * len(labels) + 1.5)
    drawing = figure((size, size))
    axes = drawing.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    drawing.colorbar(image, ax=axes, fraction=0.046)
    return svg(drawing)


def reliability(bins: list[dict[str, float]]) -> str:
    drawing = figure((4, 4))
    axes = drawing.subplots()
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    axes.bar(centres, [b["accuracy"] for b in bins], width=0.09, alpha=0.7, label="accuracy")
    axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label="observed")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.legend(fontsize=8)
    return svg(drawing)
