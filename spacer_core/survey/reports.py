"""Reports to look at: one self-contained HTML page per run, figures drawn by matplotlib.

- `training_report`: reference accuracy per epoch, confusion matrix (counts
  and row-normalised) and per-class precision, recall, F1 and support on
  the validation set.
- `evaluation_report`: the same metrics for an existing classifier scored
  on new annotations.
- `classification_report`: each image as a thumbnail with its points in
  label colours (the ones below the threshold ringed), a histogram of
  confidence and the share of points above the threshold.

Figures are PNGs embedded in the page as data URIs, so `index.html` can be
mailed or archived on its own. Only matplotlib's object API is used (no
pyplot), so drawing needs no display and touches no global backend state.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from spacer_core.storage import write_file_atomic
from spacer_core.survey.coralnet import ResultRow

__all__ = [
    "ClassMetrics",
    "class_metrics",
    "classification_report",
    "confusion_counts",
    "evaluation_report",
    "training_report",
]

REPORT_FILE = "index.html"
_THUMB_PX = 480
_DPI = 100


@dataclass(frozen=True)
class ClassMetrics:
    """Per-class figures from a confusion matrix (rows: true class, columns: predicted)."""

    classes: list[str]
    counts: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray

    @property
    def accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: accuracy, per-class metrics and the confusion counts."""
        return {
            "accuracy": self.accuracy,
            "classes": self.classes,
            "confusion": self.counts.tolist(),
            "per_class": {
                c: {
                    "precision": float(self.precision[i]),
                    "recall": float(self.recall[i]),
                    "f1": float(self.f1[i]),
                    "support": int(self.support[i]),
                }
                for i, c in enumerate(self.classes)
            },
        }


def confusion_counts(y_true: Sequence[Any], y_pred: Sequence[Any], classes: Sequence[Any]) -> np.ndarray:
    """Counts[i, j]: points of class i predicted as class j (labels outside `classes` are skipped)."""
    index = {str(c): i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        i, j = index.get(str(t)), index.get(str(p))
        if i is not None and j is not None:
            counts[i, j] += 1
    return counts


def class_metrics(y_true: Sequence[Any], y_pred: Sequence[Any], classes: Sequence[Any]) -> ClassMetrics:
    """Confusion matrix and per-class precision, recall, F1 and support (0 where undefined)."""
    counts = confusion_counts(y_true, y_pred, classes)
    hits = np.diag(counts).astype(np.float64)
    predicted = counts.sum(axis=0)
    support = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(support > 0, hits / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return ClassMetrics([str(c) for c in classes], counts, precision, recall, f1, support)


# ---------------------------------------------------------------- drawing


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _label_colours(classes: Sequence[str]) -> dict[str, str]:
    from matplotlib import colormaps

    # Red is kept for the ring that marks points below the threshold.
    small, large = colormaps["tab10"], colormaps["tab20"]
    palette = [to_hex(small(i)) for i in range(10) if i != 3]
    if len(classes) > len(palette):
        palette = [to_hex(large(i)) for i in range(20) if i not in (6, 7)]
    return {c: palette[i % len(palette)] for i, c in enumerate(classes)}


def _accuracy_figure(ref_accs: Sequence[float]) -> str:
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.subplots()
    epochs = np.arange(1, len(ref_accs) + 1)
    ax.plot(epochs, np.asarray(ref_accs) * 100, marker="o", color="#1f77b4")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reference accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy on the reference set after each epoch")
    return _png(fig)


def _confusion_figure(metrics: ClassMetrics) -> str:
    n = len(metrics.classes)
    side = max(3.0, 0.5 * n + 2)
    fig = Figure(figsize=(2 * side + 1, side))
    row_sums = metrics.counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = np.where(row_sums > 0, metrics.counts / row_sums, 0.0)
    for ax, values, title, fmt in zip(
        fig.subplots(1, 2),
        (metrics.counts, normalised),
        ("Counts", "Row-normalised (recall on the diagonal)"),
        ("{:d}", "{:.2f}"),
    ):
        scale = values.max() if values.size and values.max() > 0 else 1
        ax.imshow(values, cmap="Blues", vmin=0, vmax=scale)
        ax.set_xticks(range(n), metrics.classes, rotation=45, ha="right")
        ax.set_yticks(range(n), metrics.classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        for i in range(n):
            for j in range(n):
                value = values[i, j]
                text = fmt.format(int(value) if fmt == "{:d}" else float(value))
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value > scale / 2 else "black",
                )
    fig.tight_layout()
    return _png(fig)


def _confidence_figure(scores: Sequence[float], threshold: float) -> str:
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.subplots()
    ax.hist(scores, bins=np.linspace(0, 1, 21).tolist(), color="#4c72b0", edgecolor="white")
    ax.axvline(threshold, color="#d62728", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("confidence of the best label")
    ax.set_ylabel("points")
    ax.set_xlim(0, 1)
    ax.legend()
    ax.set_title("Confidence of the machine's labels")
    return _png(fig)


def _thumbnail_figure(
    name: str, image_bytes: bytes, rows: Sequence[ResultRow], colours: Mapping[str, str]
) -> str:
    from spacer_core.images import open_image

    with open_image(image_bytes, name=name) as image:
        width, height = image.size
        thumb = image.convert("RGB")
        thumb.thumbnail((_THUMB_PX, _THUMB_PX))
    scale = thumb.width / width
    fig = Figure(figsize=(thumb.width / _DPI, thumb.height / _DPI + 0.35))
    ax = fig.subplots()
    ax.imshow(np.asarray(thumb))
    ax.set_axis_off()
    ax.set_title(name, fontsize=9)
    for accepted in (True, False):
        chosen = [r for r in rows if r.accepted is accepted]
        if not chosen:
            continue
        ax.scatter(
            [r.col * scale for r in chosen],
            [r.row * scale for r in chosen],
            c=[colours[r.label] for r in chosen],
            s=36 if accepted else 70,
            edgecolors="white" if accepted else "#ff0000",
            linewidths=0.8 if accepted else 2.2,
        )
    return _png(fig)


def _legend_figure(colours: Mapping[str, str]) -> str:
    fig = Figure(figsize=(5.5, 0.3 + 0.25 * ((len(colours) + 3) // 4)))
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor=c,
            markeredgecolor="white",
            markersize=9,
            label=name,
        )
        for name, c in colours.items()
    ]
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="#cccccc",
            markeredgecolor="#ff0000",
            markeredgewidth=2,
            markersize=10,
            label="below threshold",
        )
    )
    fig.legend(handles=handles, loc="center", ncol=4, frameon=False)
    return _png(fig)


# ---------------------------------------------------------------- pages

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 3px 10px; border: 1px solid #ddd; }
th { background: #f3f5f8; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
.big { font-size: 1.4em; font-weight: 600; }
"""


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _summary_table(summary: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()
    )
    return f"<table>{rows}</table>"


def _metrics_table(metrics: ClassMetrics) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(c)}</td><td class=num>{metrics.precision[i]:.3f}</td>"
        f"<td class=num>{metrics.recall[i]:.3f}</td><td class=num>{metrics.f1[i]:.3f}</td>"
        f"<td class=num>{int(metrics.support[i])}</td></tr>"
        for i, c in enumerate(metrics.classes)
    )
    return f"<table>{head}{body}</table>"


def _write_page(out_dir: str | Path, title: str, sections: Sequence[str]) -> Path:
    out = Path(out_dir) / REPORT_FILE
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )
    write_file_atomic(out, page.encode("utf-8"))
    return out


def _metrics_sections(metrics: ClassMetrics, what: str) -> list[str]:
    return [
        f"<h2>Confusion matrix ({html.escape(what)})</h2>",
        _img(_confusion_figure(metrics), "confusion matrix"),
        f"<h2>Per-class metrics ({html.escape(what)})</h2>",
        _metrics_table(metrics),
    ]


def training_report(
    out_dir: str | Path, ref_accs: Sequence[float], metrics: ClassMetrics, summary: Mapping[str, Any]
) -> Path:
    """Write the training report (accuracy per epoch, validation metrics); returns the page's path."""
    sections = [
        f"<p class=big>Validation accuracy: {metrics.accuracy * 100:.1f}%</p>",
        _summary_table(summary),
        "<h2>Training</h2>",
        _img(_accuracy_figure(ref_accs), "reference accuracy per epoch"),
        *_metrics_sections(metrics, "validation set"),
    ]
    return _write_page(out_dir, "Classifier training report", sections)


def evaluation_report(out_dir: str | Path, metrics: ClassMetrics, summary: Mapping[str, Any]) -> Path:
    """Write the evaluation report of an existing classifier on new annotations."""
    sections = [
        f"<p class=big>Accuracy: {metrics.accuracy * 100:.1f}%</p>",
        _summary_table(summary),
        *_metrics_sections(metrics, "evaluated annotations"),
    ]
    return _write_page(out_dir, "Classifier evaluation report", sections)


def classification_report(
    out_dir: str | Path,
    images: Mapping[str, bytes],
    rows: Sequence[ResultRow],
    threshold: float,
    classes: Sequence[str],
    summary: Mapping[str, Any],
) -> Path:
    """Write the classification report: thumbnails with points, confidence histogram, share accepted.

    `images` maps each image name (as in `rows`) to its encoded bytes.
    """
    colours = _label_colours([str(c) for c in classes])
    accepted = sum(r.accepted for r in rows)
    share = accepted / len(rows) if rows else 0.0
    by_image: dict[str, list[ResultRow]] = {}
    for r in rows:
        by_image.setdefault(r.name, []).append(r)
    thumbs = "".join(
        _img(_thumbnail_figure(name, images[name], points, colours), name)
        for name, points in by_image.items()
    )
    sections = [
        f"<p class=big>{accepted} of {len(rows)} points ({share * 100:.1f}%) at or above"
        f" the threshold {threshold:g}; the other {len(rows) - accepted} need review.</p>",
        _summary_table(summary),
        "<h2>Confidence</h2>",
        _img(_confidence_figure([r.score for r in rows], threshold), "confidence histogram"),
        "<h2>Images</h2>",
        _img(_legend_figure(colours), "legend"),
        f"<div class=thumbs>{thumbs}</div>",
    ]
    return _write_page(out_dir, "Classification report", sections)
