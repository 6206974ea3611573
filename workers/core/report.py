"""The evaluation report in every artifact: `report.html`, one self-contained page (inline SVG plots and styles, no
scripts, nothing fetched) that a person opens to judge the model.

It shows the headline metrics against the untuned model, the training-loss and validation-metric curves, and the
sections the job's task adds (its runtime's `report_sections`): for classifiers the per-class precision, recall and
F1, the confusion matrix and the calibration (expected calibration error and a reliability diagram); for speech
recognition the example errors beside WER and CER.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from markupsafe import Markup

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT = "report.html"
METADATA = re.compile(r"<metadata>.*?</metadata>", re.DOTALL)

TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Tuneforge report: {{ job }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #1d2330; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #d6dae3; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { padding: .25rem .75rem; text-align: right; }
th { background: #eef1f6; } td:first-child, th:first-child { text-align: left; }
.better { color: #137333; } .worse { color: #b3261e; } .meta { color: #5f6673; font-size: .9rem; }
figure { margin: 1rem 0; } svg { max-width: 100%; height: auto; }
</style></head>
<body>
<h1>{{ job }}: {{ task }} on {{ base_model }}</h1>
<p class="meta">{{ steps }} steps; best {{ best_metric }} at step {{ best_step }}; adaptation {{ adaptation }}</p>
<h2 id="summary">Tuned against untuned</h2>
<table id="comparison"><tr><th>metric</th><th>untuned</th><th>tuned</th><th>change</th></tr>
{% for row in comparison %}<tr><td>{{ row.name }}</td><td>{{ row.before }}</td><td>{{ row.after }}</td>
<td class="{{ row.verdict }}">{{ row.change }}</td></tr>
{% endfor %}</table>
<h2 id="curves">Curves</h2>
{% if loss_plot %}<figure id="loss-curve">{{ loss_plot }}<figcaption>Training loss</figcaption></figure>{% endif %}
{% if metric_plot %}<figure id="metric-curves">{{ metric_plot }}<figcaption>Validation metrics</figcaption></figure>
{% endif %}
{% for section in sections %}{{ section }}
{% endfor %}</body></html>
"""
)


def figure(size: tuple[float, float]) -> Figure:
    """A figure without pyplot (no global state, no display); matplotlib loads only when a report is drawn."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.hashsalt"] = "tuneforge"  # element ids that do not change from run to run
    return Figure(figsize=size)


def svg(drawing: Figure) -> str:
    """The figure as inline SVG markup (its XML prologue dropped)."""
    buffer = io.StringIO()
    drawing.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return METADATA.sub("", text[text.index("<svg") :])  # no creation date: the same run, the same page


def _curve(points: list[dict[str, float]], keys: list[str], ylabel: str, baseline: dict[str, float]) -> str:
    drawing = figure((7, 3.2))
    axes = drawing.subplots()
    for key in keys:
        steps = [p["step"] for p in points if key in p]
        (line,) = axes.plot(steps, [p[key] for p in points if key in p], marker="o", markersize=3, label=key)
        if key in baseline:
            axes.axhline(baseline[key], linestyle=":", color=line.get_color(), label=f"{key} untuned")
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return svg(drawing)


def _comparison(
    baseline: dict[str, float], tuned: dict[str, float], maximizes: Callable[[str], bool]
) -> list[dict[str, str]]:
    rows = []
    for name in sorted(set(tuned) | set(baseline)):
        before, after = baseline.get(name), tuned.get(name)
        change, verdict = "", ""
        if before is not None and after is not None:
            delta = after - before
            lower_is_better = not maximizes(name)
            verdict = "better" if (delta < 0) == lower_is_better and delta != 0 else ("worse" if delta else "")
            change = f"{delta:+.4f}"
        rows.append(
            {
                "name": name,
                "before": "" if before is None else f"{before:.4f}",
                "after": "" if after is None else f"{after:.4f}",
                "change": change,
                "verdict": verdict,
            }
        )
    return rows


def render_report(job: str, spec: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The report page for an artifact's metrics.json content and resolved spec."""
    history: list[dict[str, float]] = metrics.get("history", [])
    tuned = metrics.get("best") or metrics.get("final") or {}
    baseline = metrics.get("baseline", {})
    metric_keys = sorted({k for row in history for k in row if k.startswith("eval_") and k != "eval_loss"})
    train_history = metrics.get("train_history", [])
    return TEMPLATE.render(
        job=job,
        task=spec.get("task", ""),
        base_model=spec.get("base_model", ""),
        adaptation=spec.get("adaptation", {}).get("method", ""),
        steps=metrics.get("steps", 0),
        best_metric=spec.get("evaluation", {}).get("best_metric", ""),
        best_step=metrics.get("best_step"),
        comparison=_comparison(baseline, tuned, _direction(spec)),
        loss_plot=markup(_curve(train_history, ["loss"], "loss", {}) if train_history else ""),
        metric_plot=markup(_curve(history, metric_keys, "value", baseline) if metric_keys else ""),
        sections=[Markup(section) for section in _task_sections(spec, metrics)],
    )


def _task_sections(spec: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """The task's own sections (per class, example errors ...); none when the spec names no known task."""
    from tuneforge.workers.tasks import registry

    try:
        runtime = registry.runtime(str(spec.get("task", "")))
    except registry.UnknownTask:
        return []
    return runtime.report_sections(metrics)


def markup(svg: str) -> Markup | str:
    """SVG made here by matplotlib goes in as markup; everything from the user is escaped by the template."""
    return Markup(svg) if svg else ""


def _direction(spec: dict[str, Any]) -> Callable[[str], bool]:
    """Whether a metric is better higher, as the spec's task says (losses are lower-is-better for every task)."""
    from tuneforge.workers.tasks import registry

    try:
        return registry.definition(str(spec.get("task", ""))).maximizes
    except registry.UnknownTask:
        return lambda name: not name.endswith("loss")


def write_report(folder: Path, job: str, spec: dict[str, Any], metrics: dict[str, Any]) -> None:
    (folder / REPORT).write_text(render_report(job, spec, metrics), encoding="utf-8")
