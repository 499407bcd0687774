"""Reports to look at: one self-contained HTML page per run, figures drawn by matplotlib.

- `training_report`: reference accuracy per epoch, the Alleviate curve
  (accuracy of the accepted points and the share accepted at each
  confidence threshold, with the threshold suggested for a target
  accuracy), confusion matrix (counts and row-normalised) and per-class
  precision, recall, F1 and support on the validation set.
- `evaluation_report`: the same for an existing classifier scored on new
  annotations.
- `classification_report`: each image as a thumbnail with its points in
  label colours (the ones below the threshold ringed), a histogram of
  confidence and the share of points above the threshold.

Figures are PNGs embedded in the page as data URIs, so `index.html` can be
mailed or archived on its own. Only matplotlib's object API is used (no
pyplot), so drawing needs no display and touches no global backend state.

Label text the figure font cannot draw as written (scripts it lacks, such as
CJK, and right-to-left scripts, which matplotlib neither shapes nor reorders)
appears in figures as a short code (`#3`); the page's HTML, which the
browser renders in any script, holds the legend and the key to those codes.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from spacer_core.storage import write_file_atomic
from spacer_core.survey.coralnet import ResultRow

__all__ = [
    "AlleviateCurve",
    "ClassMetrics",
    "ThresholdSuggestion",
    "alleviate_curve",
    "class_metrics",
    "classification_report",
    "confusion_counts",
    "evaluation_report",
    "label_order",
    "suggest_threshold",
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
    # Per point, when the scores are known: the top score and whether the
    # prediction was right; the reports draw the Alleviate curve from them.
    scores: np.ndarray | None = None
    correct: np.ndarray | None = None
    # How many images the points came from, where known: a few images make a
    # threshold suggestion uncertain however many points they hold.
    images: int | None = None

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


def class_metrics(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    classes: Sequence[Any],
    scores: Sequence[float] | np.ndarray | None = None,
) -> ClassMetrics:
    """Confusion matrix and per-class precision, recall, F1 and support (0 where undefined).

    `scores`, each point's top score in the order of `y_true`, is kept (with
    which points were right) for the Alleviate curve.
    """
    score_array = correct = None
    if scores is not None:
        score_array = _scores_array(scores)
        if not len(y_true) == len(y_pred) == len(score_array):
            raise ValueError(
                f"scores: {len(score_array)} values for {len(y_true)} true and {len(y_pred)} predicted labels"
            )
        correct = np.array([str(t) == str(p) for t, p in zip(y_true, y_pred)], dtype=bool)
    counts = confusion_counts(y_true, y_pred, classes)
    hits = np.diag(counts).astype(np.float64)
    predicted = counts.sum(axis=0)
    support = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(support > 0, hits / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return ClassMetrics(
        [str(c) for c in classes], counts, precision, recall, f1, support, score_array, correct
    )


# ---------------------------------------------------------------- Alleviate


@dataclass(frozen=True)
class AlleviateCurve:
    """Accuracy and share of the points accepted at each confidence threshold.

    A point is accepted at threshold t when its top score is >= t, as
    `classify --threshold` accepts it. `accuracy` is NaN where no point is
    accepted.
    """

    thresholds: np.ndarray
    accuracy: np.ndarray
    accepted: np.ndarray
    points: int


@dataclass(frozen=True)
class ThresholdSuggestion:
    """The lowest threshold whose accepted points reach the target accuracy."""

    threshold: float
    accuracy: float
    accepted: float
    target: float


def _scores_array(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("scores: expected a sequence of numbers") from None
    if array.ndim != 1:
        raise ValueError(f"scores: expected one score per point, got an array of shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("scores: every score must be a finite number")
    return array


def alleviate_curve(
    scores: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
    steps: int = 101,
) -> AlleviateCurve:
    """Accuracy of the points whose top score is >= t, and their share, for each threshold t.

    `scores` holds each point's top score, `correct` whether its top label
    was right. Thresholds default to `steps` even steps from 0 to 1.
    """
    score_array = _scores_array(scores)
    hits = np.asarray(correct)
    if hits.shape != score_array.shape or (hits.size and hits.dtype != np.bool_):
        raise ValueError(f"correct: expected {score_array.size} true/false values, one per score")
    if thresholds is None:
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps: expected a whole number >= 2, got {steps!r}")
        # i / (steps - 1) rather than linspace, so 0.95 is the same float as the literal.
        grid = np.arange(steps) / (steps - 1)
    else:
        grid = _scores_array(thresholds)
    order = np.argsort(score_array, kind="stable")
    ranked, ranked_hits = score_array[order], hits[order].astype(np.int64)
    # hits_from[i]: right answers among the points ranked i and above.
    hits_from = np.concatenate([np.cumsum(ranked_hits[::-1])[::-1], [0]])
    first = np.searchsorted(ranked, grid, side="left")
    n = score_array.size
    accepted_n = n - first
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(accepted_n > 0, hits_from[first] / accepted_n, np.nan)
    share = accepted_n / n if n else np.zeros(grid.size)
    return AlleviateCurve(grid, accuracy, share, n)


def suggest_threshold(curve: AlleviateCurve, target: float = 0.95) -> ThresholdSuggestion | None:
    """The lowest threshold at which the accepted points are at least `target` accurate.

    None when no threshold accepting any point reaches the target.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target: expected an accuracy above 0 and at most 1, got {target!r}")
    with np.errstate(invalid="ignore"):
        reached = (curve.accepted > 0) & (curve.accuracy >= target)
    if not reached.any():
        return None
    i = int(np.argmax(reached))
    return ThresholdSuggestion(
        float(curve.thresholds[i]), float(curve.accuracy[i]), float(curve.accepted[i]), float(target)
    )


# ---------------------------------------------------------------- drawing


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Distinct fills in an order that keeps the first few far apart; red is kept
# for the ring that marks points below the threshold, and white/black for the
# outlines that let a marker read on any photo.
_PALETTE = (
    "#4363d8",  # blue
    "#f58231",  # orange
    "#f032e6",  # magenta
    "#ffe119",  # yellow
    "#42d4f4",  # cyan
    "#3cb44b",  # green
    "#911eb4",  # purple
    "#bfef45",  # lime
    "#9a6324",  # brown
    "#fabed4",  # pink
    "#469990",  # teal
    "#000075",  # navy
    "#dcbeff",  # lavender
    "#808000",  # olive
    "#aaffc3",  # mint
    "#ffd8b1",  # apricot
)
# Past the palette, colours repeat with another marker shape.
_MARKERS = ("o", "s", "^", "D")
_RING = "#ff0000"
_EDGE = "#111111"


@dataclass(frozen=True)
class _Style:
    colour: str
    marker: str
    code: str  # the label's number, used in figures where its text cannot be drawn


def _natural_key(label: str) -> tuple[list[Any], str]:
    parts = re.split(r"(\d+)", label.casefold())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], label


def label_order(labels: Sequence[str]) -> list[str]:
    """Labels sorted as legends list them: case-insensitive, numbers by value ("2" before "10")."""
    return sorted(dict.fromkeys(str(c) for c in labels), key=_natural_key)


def _label_styles(classes: Sequence[str]) -> dict[str, _Style]:
    # Styles follow the sorted labels, not the order the classifier or rows
    # give, so a label set always gets the same colours and legend order.
    return {
        label: _Style(
            _PALETTE[i % len(_PALETTE)], _MARKERS[(i // len(_PALETTE)) % len(_MARKERS)], f"#{i + 1}"
        )
        for i, label in enumerate(label_order(classes))
    }


@functools.cache
def _figure_glyphs() -> frozenset[int]:
    """Code points the default figure font (and its fallbacks) can draw."""
    from matplotlib import font_manager, ft2font

    props = font_manager.FontProperties()
    finder = getattr(font_manager.fontManager, "_find_fonts_by_props", None)
    paths = finder(props) if finder is not None else [font_manager.findfont(props)]
    covered: set[int] = set()
    for path in paths:
        covered.update(ft2font.FT2Font(str(path)).get_charmap())
    return frozenset(covered)


def _drawable(text: str) -> bool:
    glyphs = _figure_glyphs()
    return all(ord(ch) in glyphs and unicodedata.bidirectional(ch) not in ("R", "AL", "AN") for ch in text)


def _figure_names(labels: Sequence[str], styles: Mapping[str, _Style]) -> dict[str, str]:
    """Each label as figures show it: as written when drawable, else its code."""
    # An escaped dollar keeps a label like "$5$" from being read as mathtext.
    return {c: c.replace("$", r"\$") if _drawable(c) else styles[c].code for c in labels}


def _codes_key(labels: Sequence[str], styles: Mapping[str, _Style]) -> str:
    """HTML key to the codes that stand for labels in the figures ('' when none do)."""
    coded = [c for c in label_order(labels) if not _drawable(c)]
    if not coded:
        return ""
    items = "".join(f"<li><b>{styles[c].code}</b> {html.escape(c)}</li>" for c in coded)
    return f"<p>Labels shown by their code in the figures:</p><ul class=codes>{items}</ul>"


def _swatch(style: _Style | None) -> str:
    """An inline SVG of the marker as the thumbnails draw it (None: a point below the threshold)."""
    if style is None:
        dot = f'<circle cx="9" cy="9" r="4.5" fill="#cccccc" stroke="{_EDGE}" stroke-width="1"/>'
        ring = f'<circle cx="9" cy="9" r="7" fill="none" stroke="{_RING}" stroke-width="2.2"/>'
        return f'<svg class=swatch width="18" height="18" viewBox="0 0 18 18">{dot}{ring}</svg>'
    outline = {
        "o": '<circle cx="9" cy="9" r="{r}"{a}/>',
        "s": '<rect x="{x}" y="{x}" width="{w}" height="{w}"{a}/>',
        "^": '<polygon points="9,{t} {l},{b} {rr},{b}"{a}/>',
        "D": '<polygon points="9,{t} {rr},9 9,{b} {l},9"{a}/>',
    }[style.marker]

    def shape(r: float, attrs: str) -> str:
        return outline.format(r=r, x=9 - r, w=2 * r, t=9 - r, b=9 + r, l=9 - r, rr=9 + r, a=attrs)

    halo = shape(7.5, ' fill="#ffffff"')
    mark = shape(5.5, f' fill="{style.colour}" stroke="{_EDGE}" stroke-width="1.2"')
    return f'<svg class=swatch width="18" height="18" viewBox="0 0 18 18">{halo}{mark}</svg>'


def _legend_html(styles: Mapping[str, _Style]) -> str:
    items = [f"<li>{_swatch(style)} {html.escape(label)}</li>" for label, style in styles.items()]
    items.append(f"<li>{_swatch(None)} below threshold</li>")
    return f"<ul class=legend>{''.join(items)}</ul>"


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


def _confusion_figure(metrics: ClassMetrics, names: Sequence[str]) -> str:
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
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
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


def _alleviate_figure(curve: AlleviateCurve, suggestion: ThresholdSuggestion | None, target: float) -> str:
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    ax.plot(
        curve.thresholds, curve.accuracy * 100, color="#1f77b4", lw=2, label="accuracy of accepted points"
    )
    ax.plot(curve.thresholds, curve.accepted * 100, color="#ff7f0e", lw=2, label="points accepted")
    ax.axhline(target * 100, color="#555555", linestyle=":", lw=1, label=f"target accuracy {target * 100:g}%")
    if suggestion is not None:
        ax.axvline(
            suggestion.threshold,
            color="#2ca02c",
            linestyle="--",
            label=f"suggested threshold {suggestion.threshold:.2f}",
        )
        # A line at 0 lies on the axis, where nobody sees it: a marker on the curve shows it anywhere.
        ax.plot(
            [suggestion.threshold],
            [suggestion.accuracy * 100],
            marker="v",
            ms=10,
            color="#2ca02c",
            clip_on=False,
        )
        if suggestion.threshold < 0.05:
            ax.annotate(
                f"suggested {suggestion.threshold:.2f}",
                (suggestion.threshold, suggestion.accuracy * 100),
                xytext=(12, -22),
                textcoords="offset points",
                color="#2ca02c",
                fontsize=9,
                arrowprops={"arrowstyle": "->", "color": "#2ca02c"},
            )
    ax.set_xlabel("confidence threshold (top score >= threshold is accepted)")
    ax.set_ylabel("%")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Alleviate: accuracy and share of the points accepted")
    return _png(fig)


def _thumbnail_figure(
    name: str, image_bytes: bytes, rows: Sequence[ResultRow], styles: Mapping[str, _Style]
) -> str:
    from spacer_core.images import open_image

    with open_image(image_bytes, name=name) as image:
        width, height = image.size
        thumb = image.convert("RGB")
        thumb.thumbnail((_THUMB_PX, _THUMB_PX))
    scale = thumb.width / width
    fig = Figure(figsize=(thumb.width / _DPI, thumb.height / _DPI))
    ax = fig.subplots()
    ax.imshow(np.asarray(thumb))
    ax.set_axis_off()
    for marker in _MARKERS:
        chosen = [r for r in rows if styles[r.label].marker == marker]
        if not chosen:
            continue
        xs, ys = [r.col * scale for r in chosen], [r.row * scale for r in chosen]
        # A white halo under a dark edge: the marker reads on light and dark ground alike.
        ax.scatter(xs, ys, marker=marker, s=36, c="#ffffff", edgecolors="#ffffff", linewidths=3.2)
        ax.scatter(
            xs,
            ys,
            marker=marker,
            s=36,
            c=[styles[r.label].colour for r in chosen],
            edgecolors=_EDGE,
            linewidths=1.0,
        )
    doubtful = [r for r in rows if not r.accepted]
    if doubtful:
        ax.scatter(
            [r.col * scale for r in doubtful],
            [r.row * scale for r in doubtful],
            s=110,
            facecolors="none",
            edgecolors=_RING,
            linewidths=2.2,
        )
    return _png(fig)


# ---------------------------------------------------------------- pages

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 3px 10px; border: 1px solid #ddd; }
th { background: #f3f5f8; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
.big { font-size: 1.4em; font-weight: 600; } .note { max-width: 60em; }
figure { margin: 0; } figcaption { font-size: 0.85em; text-align: center; }
ul.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 4px 18px; }
ul.legend li { display: flex; align-items: center; gap: 5px; } svg.swatch { flex: none; }
tr.suggested td { background: #e6f4e6; font-weight: 600; }
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
    styles = _label_styles(metrics.classes)
    names = _figure_names(metrics.classes, styles)
    return [
        f"<h2>Confusion matrix ({html.escape(what)})</h2>",
        _img(_confusion_figure(metrics, [names[c] for c in metrics.classes]), "confusion matrix"),
        _codes_key(metrics.classes, styles),
        f"<h2>Per-class metrics ({html.escape(what)})</h2>",
        _metrics_table(metrics),
    ]


# Thresholds the Alleviate table lists besides the suggested one.
_TABLE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def _pct(value: float) -> str:
    return "-" if np.isnan(value) else f"{value * 100:.1f}%"


def _alleviate_sections(metrics: ClassMetrics, what: str, target: float) -> list[str]:
    """The Alleviate curve, the threshold suggested for `target` and a table of thresholds."""
    head = f"<h2>Alleviate: choosing --threshold ({html.escape(what)})</h2>"
    if metrics.scores is None or metrics.correct is None:
        return []
    if metrics.scores.size == 0:
        return [head, "<p>No scored points: there is nothing to draw the curve from.</p>"]
    curve = alleviate_curve(metrics.scores, metrics.correct)
    suggestion = suggest_threshold(curve, target)
    n = curve.points
    if suggestion is not None:
        verdict = (
            f"<p class=big>Suggested --threshold {suggestion.threshold:.2f}: the points it accepts are"
            f" {_pct(suggestion.accuracy)} right (target {target * 100:g}%), and it accepts"
            f" {_pct(suggestion.accepted)} of the points.</p>"
        )
    else:
        best = int(np.nanargmax(curve.accuracy))
        verdict = (
            f"<p class=big>No threshold reaches {target * 100:g}% accuracy on these points.</p>"
            f"<p>The best is {_pct(float(curve.accuracy[best]))} at threshold"
            f" {curve.thresholds[best]:.2f}, accepting {_pct(float(curve.accepted[best]))} of the points:"
            " review every point, or train on more annotations.</p>"
        )
    if suggestion is not None and suggestion.threshold == 0:
        verdict += "<p class=big>At 0.00 every point is accepted and none goes to review.</p>"
    caution = _small_set_caution(n, metrics.images)
    explain = (
        f"<p class=note>Each of the {n} points is accepted at a threshold when its top score is at"
        " least that threshold (as <code>classify --threshold</code> accepts it); the rest go to"
        " review. Raising the threshold makes the accepted labels more accurate and leaves more"
        " points to review. The suggestion is the lowest threshold whose accepted points reach the"
        " target accuracy on these points.</p>"
    )
    listed = sorted(set(_TABLE_THRESHOLDS) | ({suggestion.threshold} if suggestion else set()))
    rows = alleviate_curve(metrics.scores, metrics.correct, thresholds=listed)
    body = "".join(
        f"<tr{' class=suggested' if suggestion and t == suggestion.threshold else ''}>"
        f"<td class=num>{t:.2f}</td><td class=num>{_pct(float(acc))}</td>"
        f"<td class=num>{_pct(float(share))}</td><td class=num>{round(share * n)}</td>"
        f"<td class=num>{n - round(share * n)}</td></tr>"
        for t, acc, share in zip(listed, rows.accuracy, rows.accepted)
    )
    table = (
        "<table><tr><th>threshold</th><th>accuracy of accepted</th><th>share accepted</th>"
        f"<th>accepted</th><th>to review</th></tr>{body}</table>"
    )
    figure = _img(_alleviate_figure(curve, suggestion, target), "Alleviate curve")
    return [head, verdict, *caution, figure, explain, table]


# Below these, a suggested threshold says more about the few images than about the classifier.
SMALL_SET_POINTS = 200
SMALL_SET_IMAGES = 3


def _small_set_caution(points: int, images: int | None) -> list[str]:
    """A warning paragraph when the points behind the suggestion are too few to trust it."""
    few_images = images is not None and images < SMALL_SET_IMAGES
    if points >= SMALL_SET_POINTS and not few_images:
        return []
    counted = f"{points} point{'s' if points != 1 else ''}"
    if images is not None:
        counted += f" of {images} image{'s' if images != 1 else ''}"
    return [
        f"<p class=big><b>Caution:</b> these figures come from only {counted} (fewer than"
        f" {SMALL_SET_POINTS} points or {SMALL_SET_IMAGES} images), so the suggested threshold is"
        " uncertain. Check it with <code>spacer evaluate</code> on newly annotated images before"
        " relying on it.</p>"
    ]


def _check_target(target: float) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target_accuracy: expected a share above 0 and at most 1, got {target!r}")
    return float(target)


def training_report(
    out_dir: str | Path,
    ref_accs: Sequence[float],
    metrics: ClassMetrics,
    summary: Mapping[str, Any],
    *,
    target_accuracy: float = 0.95,
) -> Path:
    """Write the training report (accuracy per epoch, Alleviate, validation metrics); returns its path.

    The Alleviate section appears when `metrics` holds the validation
    points' scores; it suggests the threshold for `target_accuracy`.
    """
    target = _check_target(target_accuracy)
    sections = [
        f"<p class=big>Validation accuracy: {metrics.accuracy * 100:.1f}%</p>",
        _summary_table(summary),
        *_alleviate_sections(metrics, "validation set", target),
        "<h2>Training</h2>",
        _img(_accuracy_figure(ref_accs), "reference accuracy per epoch"),
        *_metrics_sections(metrics, "validation set"),
    ]
    return _write_page(out_dir, "Classifier training report", sections)


def evaluation_report(
    out_dir: str | Path,
    metrics: ClassMetrics,
    summary: Mapping[str, Any],
    *,
    target_accuracy: float = 0.95,
) -> Path:
    """Write the evaluation report of an existing classifier on new annotations (Alleviate when scored)."""
    target = _check_target(target_accuracy)
    sections = [
        f"<p class=big>Accuracy: {metrics.accuracy * 100:.1f}%</p>",
        _summary_table(summary),
        *_alleviate_sections(metrics, "evaluated annotations", target),
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
    labels = [str(c) for c in classes]
    styles = _label_styles(labels + [r.label for r in rows])
    accepted = sum(r.accepted for r in rows)
    share = accepted / len(rows) if rows else 0.0
    by_image: dict[str, list[ResultRow]] = {}
    for r in rows:
        by_image.setdefault(r.name, []).append(r)
    # Image names go in HTML captions, which render in any script.
    thumbs = "".join(
        f"<figure>{_img(_thumbnail_figure(name, images[name], points, styles), name)}"
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, points in by_image.items()
    )
    sections = [
        f"<p class=big>{accepted} of {len(rows)} points ({share * 100:.1f}%) at or above"
        f" the threshold {threshold:g}; the other {len(rows) - accepted} need review.</p>",
        _summary_table(summary),
        "<h2>Confidence</h2>",
        _img(_confidence_figure([r.score for r in rows], threshold), "confidence histogram"),
        "<h2>Images</h2>",
        _legend_html(styles),
        f"<div class=thumbs>{thumbs}</div>",
    ]
    return _write_page(out_dir, "Classification report", sections)
