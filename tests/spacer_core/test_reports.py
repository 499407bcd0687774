"""Reports: the Alleviate curve and threshold suggestion, label styles, labels in any script."""

from __future__ import annotations

import base64
import io
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from spacer_core.survey import reports
from spacer_core.survey.coralnet import ResultRow

# ---------------------------------------------------------------- Alleviate on known inputs


def at(curve, t):
    """The curve's values at threshold t (which must be on its grid)."""
    i = int(np.flatnonzero(np.isclose(curve.thresholds, t))[0])
    return curve.accuracy[i], curve.accepted[i]


def test_curve_on_a_hand_checked_example():
    # Scores 0.9 (right), 0.8 (right), 0.6 (wrong), 0.4 (right).
    curve = reports.alleviate_curve([0.9, 0.8, 0.6, 0.4], [True, True, False, True])
    assert curve.points == 4 and len(curve.thresholds) == 101
    assert curve.thresholds[0] == 0.0 and curve.thresholds[-1] == 1.0 and curve.thresholds[95] == 0.95
    assert at(curve, 0.0) == (0.75, 1.0)
    assert at(curve, 0.4) == (0.75, 1.0)  # a score equal to the threshold is accepted
    assert at(curve, 0.41) == (pytest.approx(2 / 3), 0.75)
    assert at(curve, 0.6) == (pytest.approx(2 / 3), 0.75)
    assert at(curve, 0.61) == (1.0, 0.5)
    assert at(curve, 0.9) == (1.0, 0.25)
    accuracy, accepted = at(curve, 0.91)
    assert np.isnan(accuracy) and accepted == 0.0


def test_suggestion_is_the_lowest_threshold_reaching_the_target():
    curve = reports.alleviate_curve([0.9, 0.8, 0.6, 0.4], [True, True, False, True])
    s = reports.suggest_threshold(curve, 0.95)
    assert (s.threshold, s.accuracy, s.accepted, s.target) == (0.61, 1.0, 0.5, 0.95)
    s = reports.suggest_threshold(curve, 0.75)
    assert (s.threshold, s.accuracy, s.accepted) == (0.0, 0.75, 1.0)
    assert reports.suggest_threshold(curve, 1.0).threshold == 0.61


def test_curve_at_chosen_thresholds_matches_the_grid():
    rng = np.random.default_rng(3)
    scores, correct = rng.random(500), rng.random(500) < 0.7
    grid = reports.alleviate_curve(scores, correct)
    chosen = reports.alleviate_curve(scores, correct, thresholds=[0.25, 0.5, 0.85])
    for i, t in enumerate((0.25, 0.5, 0.85)):
        mask = scores >= t
        assert chosen.accepted[i] == mask.mean() == at(grid, t)[1]
        assert chosen.accuracy[i] == pytest.approx(correct[mask].mean())


def test_no_points():
    curve = reports.alleviate_curve([], [])
    assert curve.points == 0 and np.isnan(curve.accuracy).all() and (curve.accepted == 0).all()
    assert reports.suggest_threshold(curve) is None


def test_all_equal_scores():
    curve = reports.alleviate_curve([0.7] * 4, [True, True, True, False])
    assert at(curve, 0.0) == at(curve, 0.7) == (0.75, 1.0)
    accuracy, accepted = at(curve, 0.71)
    assert np.isnan(accuracy) and accepted == 0.0
    assert reports.suggest_threshold(curve, 0.75).threshold == 0.0
    assert reports.suggest_threshold(curve, 0.8) is None


def test_target_unreachable():
    curve = reports.alleviate_curve([0.99, 0.5, 0.2], [False, True, True])
    assert reports.suggest_threshold(curve, 0.95) is None
    # Accepting only the top point is worse, not better: the curve may fall.
    assert at(curve, 0.99) == (0.0, pytest.approx(1 / 3))


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"scores": [0.5, 0.6], "correct": [True]}, "correct"),
        ({"scores": [0.5, float("nan")], "correct": [True, False]}, "scores"),
        ({"scores": ["high"], "correct": [True]}, "scores"),
        ({"scores": [[0.5]], "correct": [[True]]}, "scores"),
        ({"scores": [0.5], "correct": [1]}, "correct"),
        ({"scores": [0.5], "correct": [True], "steps": 1}, "steps"),
    ],
)
def test_curve_names_bad_input(kwargs, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        reports.alleviate_curve(**kwargs)


@pytest.mark.parametrize("target", [0, -0.1, 1.5, float("nan"), "95%", True])
def test_suggestion_names_a_bad_target(target):
    curve = reports.alleviate_curve([0.5], [True])
    with pytest.raises(ValueError, match="^target: "):
        reports.suggest_threshold(curve, target)


def test_class_metrics_keeps_scores_and_which_points_were_right():
    m = reports.class_metrics(["A", "B", "B"], ["A", "A", "B"], ["A", "B"], scores=[0.9, 0.6, 0.8])
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.scores.tolist() == [0.9, 0.6, 0.8] and m.correct.tolist() == [True, False, True]
    assert reports.class_metrics(["A"], ["A"], ["A"]).scores is None
    with pytest.raises(ValueError, match="^scores: 2 values for 3 true"):
        reports.class_metrics(["A", "B", "B"], ["A", "A", "B"], ["A", "B"], scores=[0.9, 0.6])


# ---------------------------------------------------------------- pages


def metrics(labels, n=120, seed=0, right=0.8, scored=True):
    rng = np.random.default_rng(seed)
    truth = rng.choice(labels, n)
    pred = np.where(rng.random(n) < right, truth, rng.choice(labels, n))
    scores = np.clip(rng.random(n) * 0.5 + 0.5 * (pred == truth), 0, 1) if scored else None
    return reports.class_metrics(list(truth), list(pred), labels, scores=scores)


def pngs(page):
    return page.count("data:image/png;base64,")


def test_training_report_suggests_a_threshold(tmp_path):
    page = reports.training_report(tmp_path, [0.5, 0.8], metrics(["A", "B", "C"]), {"epochs": 2}).read_text()
    assert pngs(page) == 3  # accuracy per epoch, Alleviate, confusion matrices
    assert "Alleviate: choosing --threshold (validation set)" in page
    found = re.search(r"Suggested --threshold (\d\.\d\d): the points it accepts are ([\d.]+)% right", page)
    assert found and float(found.group(2)) >= 95
    assert "<tr class=suggested><td class=num>" + found.group(1) in page


def test_report_says_when_no_threshold_reaches_the_target(tmp_path):
    m = reports.class_metrics(["A", "B", "A"], ["B", "B", "A"], ["A", "B"], scores=[0.99, 0.5, 0.2])
    page = reports.evaluation_report(tmp_path, m, {}, target_accuracy=0.9).read_text()
    assert "No threshold reaches 90% accuracy on these points." in page
    assert "Suggested --threshold" not in page and pngs(page) == 2


def test_report_without_scores_has_no_alleviate_section(tmp_path):
    page = reports.training_report(tmp_path, [0.5], metrics(["A", "B"], scored=False), {}).read_text()
    assert "Alleviate" not in page and pngs(page) == 2


def test_report_with_no_scored_points(tmp_path):
    m = reports.class_metrics([], [], ["A", "B"], scores=[])
    page = reports.evaluation_report(tmp_path, m, {}).read_text()
    assert "No scored points" in page


@pytest.mark.parametrize("target", [0, 1.01, True, "high"])
def test_report_names_a_bad_target(tmp_path, target):
    with pytest.raises(ValueError, match="^target_accuracy: "):
        reports.training_report(tmp_path, [0.5], metrics(["A"]), {}, target_accuracy=target)


# ---------------------------------------------------------------- label styles and scripts


def test_styles_are_stable_distinct_and_in_label_order():
    labels = [f"L{i}" for i in range(40)]
    styles = reports._label_styles(labels)
    assert reports._label_styles(labels[::-1]) == styles  # the order given does not matter
    assert list(styles) == reports.label_order(labels) and list(styles)[:3] == ["L0", "L1", "L2"]
    assert list(styles)[10] == "L10"  # numbers by value: L2 .. L9 come before L10
    pairs = [(s.colour, s.marker) for s in styles.values()]
    assert len(set(pairs)) == len(pairs)
    first = [s.colour for s in list(styles.values())[: len(reports._PALETTE)]]
    assert len(set(first)) == len(first) and reports._RING not in first
    assert reports.label_order(["sand", "ALGAE", "Coral"]) == ["ALGAE", "Coral", "sand"]


NON_LATIN = ["珊瑚", "Коралл", "مرجان", "SAND", "$5$"]


def jpeg(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_non_latin_labels_render_without_missing_glyphs(tmp_path):
    rows = [
        ResultRow("礁 1.jpg", 20 + 4 * i, 20 + 6 * i, NON_LATIN[i % 5], 0.5 + i / 100, i % 3 > 0, [])
        for i in range(30)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pages = [
            reports.training_report(tmp_path / "t", [0.5, 0.7], metrics(NON_LATIN), {"名": "値"}),
            reports.evaluation_report(tmp_path / "e", metrics(NON_LATIN, seed=1), {}),
            reports.classification_report(
                tmp_path / "c", {"礁 1.jpg": jpeg((40, 130, 50))}, rows, 0.6, NON_LATIN, {}
            ),
        ]
    assert not [str(w.message) for w in caught]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert all(label in text for label in NON_LATIN)
    # Figures cannot show CJK (no such font here) or Arabic (unshaped, left to right): the HTML
    # keys their codes. Cyrillic and Latin are drawn as written.
    train = pages[0].read_text(encoding="utf-8")
    key = train[train.index("ul class=codes") :]
    key = key[: key.index("</ul>")]
    assert "珊瑚" in key and "مرجان" in key and "Коралл" not in key and "SAND" not in key
    # The classification legend lists every label in order, then the ring.
    page = pages[2].read_text(encoding="utf-8")
    legend = page[page.index("<ul class=legend>") : page.index("</ul>", page.index("<ul class=legend>"))]
    order = [legend.index(label) for label in reports.label_order(NON_LATIN)] + [
        legend.index("below threshold")
    ]
    assert order == sorted(order)
    assert "<figcaption>礁 1.jpg</figcaption>" in page and pngs(page) == 2


def test_markers_are_outlined_so_they_read_on_their_own_colour(tmp_path):
    # A point whose fill is the photo's own colour still shows: its dark edge and white halo.
    styles = reports._label_styles(["A"])
    fill = Image.new("RGB", (1, 1), styles["A"].colour).getpixel((0, 0))
    rows = [ResultRow("p.jpg", 120, 160, "A", 0.9, True, [])]
    png = reports._thumbnail_figure("p.jpg", jpeg(fill), rows, styles)
    with Image.open(io.BytesIO(base64.b64decode(png))) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    around = pixels[h // 2 - 12 : h // 2 + 12, w // 2 - 12 : w // 2 + 12]
    assert (around.sum(axis=-1) > 700).any() and (around.sum(axis=-1) < 120).any()
