"""A survey on local disk: images, CoralNet CSVs, feature files and a classifier.

The steps the shell forms and the demo take, each on top of `spacer_core.tasks`
and its message classes: extract features at each image's points, train from
an annotation CSV, classify images and evaluate a classifier on new
annotations. `LocalRunner` runs the three network/training calls in this
process; the gRPC layer offers a runner with the same methods that sends them
to a server instead. With a `LocalRunner`, extract and classify run the
images on the bulk engine (`spacer_core.bulk.local`): one image failing does
not stop the others, whose outputs are written before the failures are
reported together.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from spacer_core import crop, runtime, tasks
from spacer_core.bulk import local as bulk
from spacer_core.bulk.local import FEATURE_SUFFIX, feature_path
from spacer_core.data_classes import Annotation, DataLocation, ImageFeatures, ImageLabels, ValResults
from spacer_core.exceptions import FeatureDimensionError, InvalidInputError
from spacer_core.extractors import EfficientNetExtractor
from spacer_core.extractors.torch_weights import WeightsFileError, not_weights, plain_text
from spacer_core.inference.backends import available_cpus
from spacer_core.messages import (
    ClassifyImageMsg,
    ExtractFeaturesMsg,
    TrainClassifierMsg,
    TrainClassifierReturnMsg,
    TrainingTaskLabels,
)
from spacer_core.storage import load_classifier
from spacer_core.survey.coralnet import PointSpec, ResultRow, generate_points, point_rows, result_rows
from spacer_core.survey.reports import ClassMetrics, class_metrics
from spacer_core.task_utils import check_classifier_provenance, preprocess_labels
from spacer_core.workers import each_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
Progress = Callable[[int, int, str], None]  # (done, total, what just finished)
EpochProgress = Callable[[int, float, float], Any]  # (epoch, ref accuracy, seconds)


class SurveyError(InvalidInputError):
    """Inputs of a survey step do not fit together (an image without points, no labelled features).

    An input error (still a ValueError), so a transport reports it as the caller's.
    """


def local(path: str | Path) -> DataLocation:
    """A filesystem DataLocation for `path`, made absolute."""
    return DataLocation("filesystem", str(Path(path).resolve()))


def weights_extractor(weights: str | Path) -> EfficientNetExtractor:
    """An EfficientNet extractor for a CoralNet-format weights file, its sha256 taken here."""
    try:
        extractor = bulk.weights_extractor(weights)
    except InvalidInputError as err:
        raise SurveyError(str(err)) from None
    check_weights_file(weights)
    return extractor


def check_weights_file(weights: str | Path) -> None:
    """Refuse, before any image is read, a file that is plainly no weights file (a classifier
    pickle, an image, text): otherwise every image would fail alike, each on its own."""
    with open(weights, "rb") as f:
        wrong = not_weights(f.read(1 << 16), str(weights), kind="EfficientNet-b0 weights")
    if wrong is not None:
        raise WeightsFileError(wrong)


def image_files(paths: Iterable[str | Path] = (), folder: str | Path | None = None) -> list[Path]:
    """The images named, plus every image file directly in `folder` (sorted); names must be unique."""
    found = [Path(p) for p in paths]
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise SurveyError(f"{folder}: not a folder of images")
        # Dot-files are never images: macOS leaves `._NAME.JPG` AppleDouble files on non-Mac disks.
        found += sorted(
            p
            for p in folder.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
    if not found:
        raise SurveyError("no images given (name them, or use --images DIR)")
    for p in found:
        if not p.is_file():
            raise SurveyError(f"{p}: no such image file")
    clash = bulk.name_clash(str(p) for p in found)
    if clash is not None:
        raise SurveyError(f"{clash[1]}: another image has the same name ({clash[0]}); CSV rows match by name")
    return list(dict.fromkeys(found))


PointSource = Mapping[str, Sequence[tuple[int, int]]] | PointSpec


def points_for(image: Path, image_bytes: bytes, points: PointSource, seed: int = 0) -> list[tuple[int, int]]:
    """The image's points: its rows of a points CSV, or generated on it (seeded by its name)."""
    if isinstance(points, PointSpec):
        width, height = crop.image_size(image_bytes, image_key=image.name)
        return generate_points(points, width, height, seed=f"{seed}:{image.name}")
    rowcols = points.get(image.name)
    if not rowcols:
        raise SurveyError(f"{image.name}: {no_rows_message(image.name, points)}")
    return list(rowcols)


def _base_name(name: str) -> str:
    # Both separators: a CSV written on Windows names C:\...\Q01.JPG, one on Linux train/Q01.JPG.
    return re.split(r"[\\/]", name)[-1]


CASE_HINT = "Names must match the file name's case exactly"
FOLDER_HINT = "the Name must be the file name alone, without a folder"


def near_name(name: str, names: Iterable[str]) -> tuple[str, str] | None:
    """The one of `names` that `name` nearly is (other case, or a Name with a folder), and what to fix."""
    names = [n for n in names if n != name]
    same_case = [n for n in names if n.lower() == name.lower()]
    if same_case:
        return same_case[0], CASE_HINT
    pathlike = [n for n in names if _base_name(n) != n and _base_name(n).lower() == name.lower()]
    if pathlike:
        return pathlike[0], FOLDER_HINT
    return None


def no_rows_message(name: str, names: Iterable[str]) -> str:
    """Why an image has no points CSV rows, with the nearest cause: a Name differing in case or folder."""
    text = "no rows with this Name in the points CSV"
    near = near_name(name, names)
    return f"{text} (it has '{near[0]}': {near[1]})" if near else text


class Runner(Protocol):
    """The calls that need the network or the trainer: in process, or on a server."""

    def extract(
        self,
        extractor: EfficientNetExtractor,
        image: Path,
        rowcols: Sequence[tuple[int, int]],
        feature_file: Path,
    ) -> None: ...

    def train(
        self,
        labels: TrainingTaskLabels,
        model_file: Path,
        valresult_file: Path,
        clf_type: str,
        epochs: int,
        progress: EpochProgress | None,
    ) -> TrainClassifierReturnMsg: ...

    def classify(
        self,
        extractor: EfficientNetExtractor,
        image: Path,
        rowcols: Sequence[tuple[int, int]],
        classifier_file: Path,
    ) -> tuple[list[Any], list[list[float]]]: ...


class LocalRunner:
    """Runs each step in this process through spacer_core.tasks.

    `workers` images are extracted or classified at once (default one per
    core): each worker does whole images, and the CPU backend gives each a
    single-thread session of its own, so both cores stay on the network
    while another image decodes.
    """

    def __init__(self, workers: int | None = None):
        self.workers = workers or available_cpus()

    def extract(
        self,
        extractor: EfficientNetExtractor,
        image: Path,
        rowcols: Sequence[tuple[int, int]],
        feature_file: Path,
    ) -> None:
        msg = ExtractFeaturesMsg(image.name, extractor, list(rowcols), local(image), local(feature_file))
        tasks.extract_features(msg)

    def train(
        self,
        labels: TrainingTaskLabels,
        model_file: Path,
        valresult_file: Path,
        clf_type: str,
        epochs: int,
        progress: EpochProgress | None,
    ) -> TrainClassifierReturnMsg:
        msg = TrainClassifierMsg(
            job_token=model_file.name,
            trainer="minibatch",
            nbr_epochs=epochs,
            clf_type=clf_type,
            labels=labels,
            previous_model_locs=[],
            model_loc=local(model_file),
            valresult_loc=local(valresult_file),
        )
        return tasks.train_classifier(msg, progress=progress)

    def classify(
        self,
        extractor: EfficientNetExtractor,
        image: Path,
        rowcols: Sequence[tuple[int, int]],
        classifier_file: Path,
    ) -> tuple[list[Any], list[list[float]]]:
        msg = ClassifyImageMsg(image.name, extractor, list(rowcols), local(image), local(classifier_file))
        result = tasks.classify_image(msg)
        return list(result.classes), [list(s) for _, _, s in result.scores]


@dataclass
class ExtractOutcome:
    image: str
    points: int
    feature_file: Path


def extract_images(
    runner: Runner,
    extractor: EfficientNetExtractor,
    images: Sequence[Path],
    points: PointSource,
    features_dir: str | Path,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[ExtractOutcome]:
    """Extract each image's features at its points into features_dir (pyspacer feature files).

    The runner's `workers` images run at once; outcomes come in image order.
    A `LocalRunner` runs them on the bulk engine: every image is tried, the
    others' files are written, and the failures raise together at the end
    (progress as images finish). Other runners report progress in image order
    and the first image that fails (in that order) raises.
    """
    if isinstance(runner, LocalRunner):
        items, pointless = _plan(images, points, seed)
        task = bulk.BulkTask.extract(extractor, features_dir, overwrite=True)
        try:
            _run_on_bulk(task, items, runner.workers, progress, pointless)
        except ImagesFailed as err:
            failed = {f.file for f in err.failures}
            err.done = [
                ExtractOutcome(i.name, len(i.rowcols), feature_path(features_dir, i.name))
                for i in items
                if i.location.key not in failed
            ]
            raise
        return [ExtractOutcome(i.name, len(i.rowcols), feature_path(features_dir, i.name)) for i in items]

    def one(image: Path) -> ExtractOutcome:
        rowcols = points_for(image, image.read_bytes(), points, seed)
        target = feature_path(features_dir, image.name)
        runner.extract(extractor, image, rowcols, target)
        return ExtractOutcome(image.name, len(rowcols), target)

    out = []
    for i, outcome in enumerate(_in_order(one, images, getattr(runner, "workers", 1))):
        out.append(outcome)
        if progress:
            progress(i + 1, len(images), outcome.image)
    return out


T = TypeVar("T")


def _plan(
    images: Sequence[Path], points: PointSource, seed: int
) -> tuple[list[bulk.BulkImage], list[Failure]]:
    """The images as bulk work, each with its points, and a failure for each image without any.

    An image has no points when a points CSV has no rows for it, or, with generated
    points, when its size cannot be read (an empty, damaged or non-image file): it
    costs that image, not the run. With no image left, ImagesFailed lists them all
    (one image: its own error's message).
    """
    items: list[bulk.BulkImage] = []
    failures: list[Failure] = []
    first: Exception | None = None
    for image in images:
        try:
            # Only generated points need the image (its size); CSV points are looked up by name.
            data = image.read_bytes() if isinstance(points, PointSpec) else b""
            rowcols = tuple(points_for(image, data, points, seed))
        except (InvalidInputError, OSError) as err:
            first = first or err
            failures.append(Failure(str(image.resolve()), one_line(err, image.name, str(image))))
            continue
        items.append(bulk.BulkImage(image.name, local(image), rowcols))
    if not items and first is not None:
        message = str(first) if len(failures) == 1 else f"all {len(failures)} images failed"
        raise ImagesFailed(message, failures, {})
    return items, failures


def _run_on_bulk(
    task: bulk.BulkTask,
    items: Sequence[bulk.BulkImage],
    workers: int,
    progress: Progress | None,
    pointless: Sequence[Failure] = (),
) -> dict[str, bulk.Outcome]:
    """Every image on the bulk engine under the current runtime; outcomes by image name.

    One failing image does not stop the others; once all have run, the
    failures (with `pointless`, images left out for want of points) raise
    together as one ImagesFailed.
    """
    outcomes: dict[str, bulk.Outcome] = {}
    # Closed as soon as the loop ends, however it ends: no worker outlives a Ctrl-C here.
    with contextlib.closing(bulk.local_outcomes(task, items, runtime.current(), workers)) as finished:
        for outcome in finished:
            outcomes[outcome.name] = outcome
            if progress:
                progress(len(outcomes), len(items), outcome.name)
    failed = [outcomes[i.name] for i in items if not outcomes[i.name].ok]
    if failed or pointless:
        failures = [*_failures(items, failed), *pointless]
        listed = "; ".join(
            [o.error if o.name in o.error else f"{o.name}: {o.error}" for o in failed]
            + [f"{Path(f.file).name}: {f.reason}" for f in pointless]
        )
        total = len(items) + len(pointless)
        if total == 1:
            raise ImagesFailed(listed, failures, outcomes)
        raise ImagesFailed(
            f"{len(failures)} of {total} images failed (the others are done): {listed}", failures, outcomes
        )
    return outcomes


class ImagesFailed(SurveyError):
    """Some images of a run failed, the others are done: `failures` lists the former, and
    `done` holds what the others gave (as the step returns it), set by the step."""

    def __init__(self, message: str, failures: list[Failure], outcomes: dict[str, bulk.Outcome]):
        super().__init__(message)
        self.failures = failures
        self.outcomes = outcomes
        self.done: Any = None


def _failures(items: Sequence[bulk.BulkImage], failed: Sequence[bulk.Outcome]) -> list[Failure]:
    where = {i.name: i.location.key for i in items}
    out = []
    for o in failed:
        path = where.get(o.name, o.name)
        reason = plain_text(o.error) or "failed"
        for prefix in (path, o.name):
            reason = reason.removeprefix(f"{prefix}: ")
        out.append(Failure(path, reason))
    return out


def missing_images(points: PointSource, images: Sequence[Path]) -> list[str]:
    """Names a points CSV gives points for that are none of `images` (generated points: none)."""
    if isinstance(points, PointSpec):
        return []
    have = {p.name for p in images}
    return [name for name in points if Path(name).name not in have]


def name_point_rows(failures: Sequence[Failure], points_csv: str | Path) -> list[Failure]:
    """Failures of images with a point outside the image, retold naming the points CSV row.

    Only failed images are looked at again, so a run with good points pays nothing.
    """
    rows: dict[tuple[str, int, int], int] | None = None
    out = []
    for f in failures:
        try:
            width, height = crop.image_size(Path(f.file).read_bytes(), image_key=f.file)
        except Exception:  # the image itself is at fault: its own reason stands
            out.append(f)
            continue
        if rows is None:
            rows = point_rows(points_csv)
        name = Path(f.file).name
        outside = sorted(
            (line, r, c)
            for (n, r, c), line in rows.items()
            if Path(n).name == name and not (r < height and c < width)
        )
        if not outside:
            out.append(f)
            continue
        line, r, c = outside[0]
        more = f" ({len(outside) - 1} more outside)" if len(outside) > 1 else ""
        out.append(
            Failure(
                f.file,
                f"{points_csv}, row {line}: point (row {r}, column {c}) is outside the image"
                f" ({width} x {height} pixels; rows 0-{height - 1}, columns 0-{width - 1}){more}",
            )
        )
    return out


def _in_order(work: Callable[[Path], T], images: Sequence[Path], workers: int) -> Iterator[T]:
    """work(image) for every image, `workers` at a time, yielded in image order."""
    return each_image(work, images, workers, name="survey-image", ordered=True)


def labels_from_annotations(
    annotations: Mapping[str, Sequence[Annotation]],
    features_dir: str | Path,
) -> ImageLabels:
    """ImageLabels pointing at each annotated image's feature file (which must exist)."""
    missing = [n for n in annotations if not feature_path(features_dir, n).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SurveyError(
            f"{features_dir}: no feature file for {shown} (expected <Name>{FEATURE_SUFFIX}; run extract first)"
        )
    return ImageLabels({local(feature_path(features_dir, n)): list(a) for n, a in annotations.items()})


@dataclass(frozen=True)
class Failure:
    """One input that could not be used: the file at fault and why, in one line."""

    file: str
    reason: str


# pyspacer splits by image (SplitMode.VECTORS): whole images go to the validation set (about
# 10% of the points), then the reference set (10%), the rest to training; each set needs one.
MIN_TRAINING_IMAGES = 3


def usable_features(
    annotations: Mapping[str, Sequence[Annotation]], features_dir: str | Path
) -> tuple[dict[str, list[Annotation]], list[Failure]]:
    """The annotated images whose feature file loads and holds every annotated point, and the rest.

    A missing, corrupt or mismatched feature file costs its image, not the run;
    when no image has a feature file at all, extraction was not run: that raises.
    """
    if not any(feature_path(features_dir, n).is_file() for n in annotations):
        labels_from_annotations(annotations, features_dir)  # raises, naming the missing files
    usable: dict[str, list[Annotation]] = {}
    failures: list[Failure] = []
    for name, points in annotations.items():
        path = feature_path(features_dir, name)
        if not path.is_file():
            failures.append(Failure(str(path), f"no feature file for {name} (run extract first)"))
            continue
        try:
            ImageFeatures.load(local(path)).match_arrays(points, source=str(path))
        except Exception as err:  # whatever a damaged file raises, the others still count
            failures.append(Failure(str(path), one_line(err, str(path), str(path.resolve()))))
            continue
        usable[name] = list(points)
    return usable, failures


def one_line(err: BaseException, *sources: str) -> str:
    """`err` as one line without terminal escape codes, less a leading `source: ` (the caller names it)."""
    text = plain_text(err) or type(err).__name__
    for source in sources:
        text = text.removeprefix(f"{source}: ")
    return text


def check_training_images(count: int, skipped: Sequence[Failure] = ()) -> None:
    """Refuse, in words, a training set with fewer images than pyspacer's split can use."""
    if count >= MIN_TRAINING_IMAGES:
        return
    why = (
        f"too few images: training needs at least {MIN_TRAINING_IMAGES} annotated images (got {count});"
        " whole images are split into validation (about 10% of the points), reference (10%)"
        " and training sets, and each needs at least one"
    )
    if skipped:
        why += f" ({len(skipped)} more could not be used: {skipped[0].file}: {skipped[0].reason})"
    raise SurveyError(why)


def dropped_classes(before: ImageLabels, after: TrainingTaskLabels) -> dict[str, int]:
    """Classes the split left out of training ({label: points}), and so never predicted."""
    kept = after.train.classes_set
    return {str(c): n for c, n in sorted(before.label_count_per_class.items(), key=str) if c not in kept}


@dataclass
class TrainOutcome:
    result: TrainClassifierReturnMsg
    metrics: ClassMetrics
    counts: dict[str, int]  # annotations in each of the train / ref / val sets
    valresult_file: Path
    skipped: list[Failure] = field(default_factory=list)  # images left out: no usable feature file
    dropped: dict[str, int] = field(default_factory=dict)  # classes the split left out, with points


def valresult_path(model_file: str | Path) -> Path:
    """Where training stores the validation results: beside the classifier, .valresult.json."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.stem + ".valresult.json")


def train(
    runner: Runner,
    annotations: Mapping[str, Sequence[Annotation]],
    features_dir: str | Path,
    model_file: str | Path,
    *,
    clf_type: str = "MLP",
    epochs: int = 10,
    progress: EpochProgress | None = None,
) -> TrainOutcome:
    """Split the annotations as pyspacer does, train, store the classifier; metrics on the val set.

    Images whose feature file is missing or damaged are left out (the outcome
    lists them), as long as enough images remain; so are classes too small to
    reach both the training and the reference set (the outcome names them).
    """
    annotations, skipped = usable_features(annotations, features_dir)
    check_training_images(len(annotations), skipped)
    unsplit = labels_from_annotations(annotations, features_dir)
    labels = preprocess_labels(unsplit)
    model_file = Path(model_file).resolve()
    val_file = valresult_path(model_file)
    result = runner.train(labels, model_file, val_file, clf_type, epochs, progress)
    val = ValResults.load(local(val_file))
    classes = [str(c) for c in val.classes]
    metrics = class_metrics(
        [classes[i] for i in val.gt], [classes[i] for i in val.est], classes, scores=val.scores
    )
    metrics = replace(metrics, images=len(list(labels["val"].keys())))
    counts = {name: labels[name].label_count for name in ("train", "ref", "val")}
    return TrainOutcome(result, metrics, counts, val_file, skipped, dropped_classes(unsplit, labels))


def evaluate(
    classifier_file: str | Path, annotations: Mapping[str, Sequence[Annotation]], features_dir: str | Path
) -> ClassMetrics:
    """Score an existing classifier on annotated feature files; nothing is retrained.

    Annotations with labels the classifier does not know count as errors
    and appear as their own row of the confusion matrix.
    """
    return evaluate_survey(classifier_file, annotations, features_dir).metrics


@dataclass
class EvaluateOutcome:
    metrics: ClassMetrics
    skipped: list[Failure]  # images left out: no usable feature file
    unknown: dict[str, int]  # annotated labels that are none of the classifier's classes, with points
    classes: list[str]  # the classifier's classes
    shared: int  # annotated labels that are classes of the classifier

    def warnings(self) -> list[str]:
        """What makes the accuracy mean less than it seems, one line each."""
        if not self.unknown:
            return []
        shown = ", ".join(f"{label} ({n} points)" for label, n in self.unknown.items())
        if self.shared == 0:
            return [
                f"none of the annotations' labels is a class of the classifier: {shown} against"
                f" {', '.join(self.classes)}; every point counts as an error (another label set?)"
            ]
        return [
            f"labels the classifier never predicts (not among its classes {', '.join(self.classes)}):"
            f" {shown}; their points count as errors"
        ]


def evaluate_survey(
    classifier_file: str | Path, annotations: Mapping[str, Sequence[Annotation]], features_dir: str | Path
) -> EvaluateOutcome:
    """`evaluate`, plus the images left out and the labels the classifier cannot predict."""
    annotations, skipped = usable_features(annotations, features_dir)
    if not annotations:
        raise SurveyError(
            f"{features_dir}: no usable feature file ({skipped[0].file}: {skipped[0].reason})"
            if skipped
            else f"{features_dir}: no annotated images"
        )
    labels = labels_from_annotations(annotations, features_dir)
    clf = load_classifier(local(classifier_file))
    known = [str(c) for c in clf.classes_]
    y_true: list[str] = []
    y_pred: list[str] = []
    scores: list[float] = []
    for loc, points in labels.items():
        features = ImageFeatures.load(loc)
        check_classifier_provenance(clf, features.provenance, str(classifier_file), loc.key)
        feats, truth = features.match_arrays(points, source=loc.key)
        probs = tasks.score_features(clf, np.asarray(feats, dtype=np.float64), loc.key)
        y_true += [str(t) for t in truth]
        y_pred += [known[i] for i in np.argmax(probs, axis=1)]
        scores += np.max(probs, axis=1).tolist()
    extra = sorted(set(y_true) - set(known))
    unknown = {label: y_true.count(label) for label in extra}
    metrics = replace(
        class_metrics(y_true, y_pred, known + extra, scores=scores), images=len(list(labels.keys()))
    )
    return EvaluateOutcome(metrics, skipped, unknown, known, len(set(y_true) & set(known)))


def classify_images(
    runner: Runner,
    extractor: EfficientNetExtractor,
    classifier_file: str | Path,
    images: Sequence[Path],
    points: PointSource,
    *,
    threshold: float,
    seed: int = 0,
    progress: Progress | None = None,
    given: Mapping[str, Mapping[tuple[int, int], str]] | None = None,
) -> tuple[list[ResultRow], list[str]]:
    """Classify each image's points; rows in image order, and the classifier's classes.

    `given` holds the labels a person gave some points ({image name:
    {(row, col): label}}, as `coralnet.read_point_labels` reads them): they
    stay the rows' upload labels whatever the classifier scores.
    A `LocalRunner` runs the images on the bulk engine (see `extract_images`).
    """
    # A classifier nothing can use (not a prefit CalibratedClassifierCV, a
    # damaged pickle, trained on features of another size) fails the run
    # once, before any image is read.
    clf = runtime.current().classifier(local(classifier_file))
    expected = runtime.classifier_feature_dim(clf)
    if expected is not None and extractor is not None and expected != extractor.feature_dim:
        raise FeatureDimensionError(
            f"{classifier_file}: the classifier was trained on features of dimension {expected},"
            f" but the extractor gives {extractor.feature_dim}; use the classifier made with these weights"
        )
    if isinstance(runner, LocalRunner):
        items, pointless = _plan(images, points, seed)
        rt = runtime.current()
        # The bulk engine keeps each image's scores in a part file; these go once the rows are read.
        with tempfile.TemporaryDirectory(prefix="spacer-classify-") as parts:
            task = bulk.BulkTask.classify(
                extractor, local(classifier_file), Path(parts) / "results.csv", threshold, overwrite=True
            )
            try:
                outcomes = _run_on_bulk(task, items, runner.workers, progress, pointless)
            except ImagesFailed as err:
                # The good images' rows are read before their part files go.
                err.done = bulk.result_rows(task, items, err.outcomes, rt, given)
                raise
            return bulk.result_rows(task, items, outcomes, rt, given)
    rows: list[ResultRow] = []
    classes: list[str] = []
    model = Path(classifier_file).resolve()

    def one(image: Path) -> tuple[Path, list[tuple[int, int]], list[Any], list[list[float]]]:
        rowcols = points_for(image, image.read_bytes(), points, seed)
        found, scores = runner.classify(extractor, image, rowcols, model)
        return image, rowcols, found, scores

    for i, (image, rowcols, found, scores) in enumerate(
        _in_order(one, images, getattr(runner, "workers", 1))
    ):
        classes = [str(c) for c in found]
        rows += result_rows(image.name, rowcols, classes, scores, threshold, (given or {}).get(image.name))
        if progress:
            progress(i + 1, len(images), image.name)
    return rows, classes
