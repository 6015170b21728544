"""Evaluation report: metrics.json, report.md and PNG plots (matplotlib, Agg canvas).

`plots_data` maps a plot kind to {name: data}; every entry becomes one PNG
`<kind>_<name>.png` referenced from report.md:

    "per_class_accuracy": {name: {"class_names": [...], "accuracy": [...]}}
    "confusion_matrix":   {name: {"class_names": [...] (rows, true),
                                  "matrix": [[...]] counts [rows, cols],
                                  "column_names": [...] (optional, predicted; default rows)}}
                          drawn only when rows and columns are both <= 30 classes
    "fewshot":            {name: {"shots": [...], "mean": [...], "std": [...]}}
    "recall_at_k":        {name: {"ks": [...], "recall": [...]}}   # one curve per name
    "roc":                {name: {"scores": [...], "labels": [...]}}  # 1 = anomaly

The evaluators' `return_details=True` outputs carry these fields (zero-shot details:
"per_class_accuracy" with "class_ids", "confusion"; few-shot: "shots", "mean", "std";
retrieval: "ks", "recall"; anomaly: "scores", "labels").
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_CONFUSION_CLASSES = 30
PLOT_KINDS = ("per_class_accuracy", "confusion_matrix", "fewshot", "recall_at_k", "roc")


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}} -> {"a/b": 1.0}: the flat scalar dict for logs and TensorBoard.

    Non-scalar leaves (arrays, strings) are skipped.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (bool, np.bool_)):
            flat[name] = float(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            flat[name] = float(value)
        elif isinstance(value, np.ndarray) and value.ndim == 0:
            flat[name] = float(value)
    return flat


def _json_ready(value):
    """Convert NumPy values for json.dump; NaN/inf become null (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "plot"


def _new_figure(width: float = 6.4, height: float = 4.8) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plot_per_class_accuracy(data: Mapping, title: str) -> Figure:
    accuracy = np.asarray(data["accuracy"], dtype=np.float64)
    names = [str(n) for n in data.get("class_names", range(accuracy.size))]
    if len(names) != accuracy.size:
        raise ValueError(f"per_class_accuracy[{title!r}]: {len(names)} class_names for "
                         f"{accuracy.size} accuracies")
    fig = _new_figure(max(6.4, 0.25 * accuracy.size), 4.8)
    ax = fig.add_subplot()
    ax.bar(np.arange(accuracy.size), np.nan_to_num(accuracy))
    ax.set_xticks(np.arange(accuracy.size), names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot_confusion(data: Mapping, title: str) -> Figure:
    matrix = np.asarray(data["matrix"], dtype=np.float64)
    rows = [str(n) for n in data.get("class_names", range(matrix.shape[0]))]
    cols = [str(n) for n in data.get("column_names", rows)]
    if matrix.shape != (len(rows), len(cols)):
        raise ValueError(f"confusion_matrix[{title!r}]: matrix shape {matrix.shape} does not "
                         f"match {len(rows)} row and {len(cols)} column names")
    fig = _new_figure(max(5.0, 0.3 * len(cols) + 2), max(4.0, 0.3 * len(rows) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(np.arange(len(cols)), cols, rotation=90, fontsize=6)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot_fewshot(data: Mapping, title: str) -> Figure:
    shots = np.asarray(data["shots"], dtype=np.float64)
    mean = np.asarray(data["mean"], dtype=np.float64)
    std = np.asarray(data.get("std", np.zeros_like(mean)), dtype=np.float64)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.errorbar(shots, mean, yerr=std, marker="o", capsize=4)
    ax.set_xticks(shots, [f"{s:g}" for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (mean +- std over seeds)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot_recall(data: Mapping, title: str) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(np.asarray(data["ks"]), np.asarray(data["recall"]), marker=".")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot_roc(data: Mapping, title: str) -> Figure:
    from sklearn.metrics import roc_curve  # only the report needs scikit-learn

    from evclip_jax.evaluate.anomaly import roc_auc

    scores, labels = np.asarray(data["scores"]), np.asarray(data["labels"])
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label=f"AUC = {roc_auc(scores, labels):.4f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


_PLOTTERS = {
    "per_class_accuracy": _plot_per_class_accuracy,
    "confusion_matrix": _plot_confusion,
    "fewshot": _plot_fewshot,
    "recall_at_k": _plot_recall,
    "roc": _plot_roc,
}


def write_report(
    metrics: Mapping,
    out_dir: str | os.PathLike,
    plots_data: Mapping[str, Mapping[str, Mapping]] | None = None,
) -> dict[str, float]:
    """Write metrics.json, report.md and one PNG per `plots_data` entry into `out_dir`.

    `metrics` may be nested ({dataset: {metric: value}}). Returns the flat scalar dict
    (`flatten_metrics`) for the trainer's TensorBoard writer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots_data = plots_data or {}
    unknown = sorted(set(plots_data) - set(_PLOTTERS))
    if unknown:
        raise ValueError(f"plots_data: unknown plot kinds {unknown}; expected {PLOT_KINDS}")
    flat = flatten_metrics(metrics)
    with open(out / "metrics.json", "w") as f:
        json.dump(_json_ready(metrics), f, indent=2, sort_keys=True)

    lines = ["# Evaluation report", "", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.6g} |" for name, value in sorted(flat.items())]
    lines.append("")
    written: set[str] = set()
    for kind in PLOT_KINDS:
        entries = plots_data.get(kind, {})
        if not entries:
            continue
        lines += [f"## {kind.replace('_', ' ')}", ""]
        for name, data in entries.items():
            title = str(name)
            if kind == "confusion_matrix":
                shape = np.shape(data["matrix"])
                if max(shape) > MAX_CONFUSION_CLASSES:
                    lines += [f"{name}: confusion matrix {shape[0]}x{shape[1]} not drawn "
                              f"(more than {MAX_CONFUSION_CLASSES} classes).", ""]
                    continue
            filename = f"{kind}_{_safe_name(name)}.png"
            while filename in written:
                filename = filename[:-4] + "_.png"
            written.add(filename)
            fig = _PLOTTERS[kind](data, title)
            fig.savefig(out / filename)
            lines += [f"### {name}", "", f"![{kind} {name}]({filename})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return flat


def plot_curves(curves: Mapping[str, tuple], path: str | os.PathLike, *, ylabel: str,
                chance: float | None = None, title: str = "") -> Path:
    """One line per name over training steps, with a shaded spread where given, to ``path``.

    ``curves``: name -> (steps, values, spread or None); e.g. mean and standard deviation over
    seeds (the paper's Fig. 4: unseen-class zero-shot accuracy against pre-training step).
    """
    fig = _new_figure(7.2, 4.8)
    ax = fig.add_subplot()
    for name, (steps, values, spread) in curves.items():
        steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
        line = ax.plot(steps, values, marker="o", markersize=3, label=name)[0]
        if spread is not None:
            spread = np.asarray(spread, np.float64)
            ax.fill_between(steps, values - spread, values + spread, alpha=0.15,
                            color=line.get_color())
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
