"""Bulk work on whole surveys: plan images from a manifest, run each through the pipeline.

    task = BulkTask.extract(extractor, out="features/")          # or BulkTask.classify(...)
    items = plan("points.csv")                                   # one BulkImage per Name
    summary = run(task, items, progress=print)                   # the local engine

The manifest is a CoralNet-style CSV, one row per point (`Name`, `Row`,
`Column`); `Name` is a filesystem path (relative ones are taken from the
manifest's folder), `s3://bucket/key` or an http(s) URL, read through
`spacer_core.storage` like every other location, so the active storage
policy applies.

This module is the engine-independent part: the plan, the per-image steps
(`prepare_image`, `image_features`, `finish_image`, each the library
pipeline's; `process_image` is `pipeline.run`), the resume check, the
summary and the results CSV. The local engine (`run`, `local_outcomes`) runs
the steps in this process; `spacer_core.bulk.ray_engine` runs the same steps
on Ray Data. An engine run builds one `Runtime` for the task (or is handed
one) and holds it to the end: networks stay loaded for all its images, and
nothing outlives the run. Per-image errors are recorded in the summary and
never stop the job; every output is written atomically, and a rerun skips
images whose output exists (unless `overwrite`), so an interrupted job
resumes where it stopped.

Outputs: extract writes `<out>/<image file name>.featurevector` (pyspacer's
format) and `<out>/_summary.json`; classify keeps each image's scores in
`<out>.parts/<image file name>.scores.json` (its resume state), its summary
in `<out>.parts/_summary.json`, and writes the results CSV at `<out>` from
all parts, in manifest order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

from spacer_core import pipeline
from spacer_core.data_classes import DataLocation, FeatureProvenance, ImageFeatures, points_sha256
from spacer_core.exceptions import InvalidInputError, SpacerError
from spacer_core.extractors import EfficientNetExtractor, FeatureExtractor
from spacer_core.inference.backends import available_cpus
from spacer_core.inference.network import NetworkSpec
from spacer_core.runtime import Runtime, RuntimeSettings, current
from spacer_core.storage import ALLOW_ALL, StoragePolicy, data_exists, load_bytes, store_bytes
from spacer_core.survey import coralnet
from spacer_core.workers import each_image

RowCol = tuple[int, int]
Kind = Literal["extract", "classify"]
# (images done, images in the job, points done) after each image.
Progress = Callable[[int, int, int], None]

# Output names, one home for the bulk engines and the survey workflow.
FEATURE_SUFFIX = ".featurevector"  # pyspacer's feature files: <image file name>.featurevector
SCORES_SUFFIX = ".scores.json"
SUMMARY_NAME = "_summary.json"


def feature_path(features_dir: str | Path, image_name: str) -> Path:
    """Where the feature file of an image lives: DIR/<image file name>.featurevector."""
    return Path(features_dir) / f"{image_name}{FEATURE_SUFFIX}"


def weights_extractor(weights: str | Path) -> EfficientNetExtractor:
    """An EfficientNet extractor for a CoralNet-format weights file, its sha256 taken here."""
    path = Path(weights)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise InvalidInputError(f"{path}: cannot read the weights file ({err.strerror})") from None
    loc = DataLocation("filesystem", str(path.resolve()))
    return EfficientNetExtractor(data_locations={"weights": loc}, data_hashes={"weights": digest})


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class BulkImage:
    """One image of a manifest: its Name as written, where it is read from, its points, and the
    labels a person gave some of them in the manifest's Label column ((row, col, label))."""

    name: str
    location: DataLocation
    rowcols: tuple[RowCol, ...]
    labels: tuple[tuple[int, int, str], ...] = ()

    @property
    def file_name(self) -> str:
        """The last part of the Name: outputs are named after it."""
        return file_name(self.name)


def location_for(name: str, base_dir: str | Path = ".") -> DataLocation:
    """The DataLocation a manifest's Name stands for: s3://bucket/key, an http(s) URL or a path."""
    parsed = urlparse(name)
    if parsed.scheme == "s3":
        key = parsed.path.lstrip("/")
        if not parsed.netloc or not key:
            raise InvalidInputError(f"{name!r}: an S3 name needs the form s3://bucket/key")
        return DataLocation("s3", key, bucket_name=parsed.netloc)
    if parsed.scheme in ("http", "https"):
        return DataLocation("url", name)
    return DataLocation("filesystem", str((Path(base_dir) / name).resolve()))


def file_name(name: str) -> str:
    """The last path segment of a Name (a path, S3 key or URL)."""
    parsed = urlparse(name)
    if parsed.scheme in ("s3", "http", "https"):
        return PurePosixPath(parsed.path).name
    return Path(name).name


def name_clash(names: Iterable[str]) -> tuple[str, str] | None:
    """The first two different names that end in the same file name, (earlier, later), or None.

    Outputs and CSV rows go by the file name, so two images may not share one;
    the same name given twice is no clash.
    """
    seen: dict[str, str] = {}
    for name in names:
        first = seen.setdefault(file_name(name), name)
        if first != name:
            return first, name
    return None


def plan(manifest: str | Path, shard: int = 0, shards: int = 1) -> list[BulkImage]:
    """The images of a manifest, in the order they first appear; shard `shard` of `shards`.

    Image i (0-based, manifest order) belongs to shard i % shards. Image file
    names must be unique: outputs are named after them.
    """
    if shards < 1 or not 0 <= shard < shards:
        raise InvalidInputError(f"shard {shard} of {shards}: expected 0 <= shard < shards and shards >= 1")
    path = Path(manifest)
    points = coralnet.read_points(path)
    for name in points:
        if not file_name(name):
            raise InvalidInputError(f"{path}: Name {name!r} does not end in a file name")
    clash = name_clash(points)
    if clash is not None:
        raise InvalidInputError(
            f"{path}: Names {clash[0]!r} and {clash[1]!r} end in the same file name"
            f" {file_name(clash[0])!r}; outputs are named after it"
        )
    labels = coralnet.read_point_labels(path)
    items = [
        BulkImage(
            name,
            location_for(name, path.parent),
            tuple(rc),
            tuple((r, c, label) for (r, c), label in labels.get(name, {}).items()),
        )
        for name, rc in points.items()
    ]
    return items[shard::shards]


def shard_label(shard: int, shards: int) -> str:
    """'' for a whole manifest, else `.shard-I-of-N` (added to per-shard file names)."""
    return "" if shards == 1 else f".shard-{shard}-of-{shards}"


# ---------------------------------------------------------------- task


@dataclass(frozen=True)
class BulkTask:
    """What to do with every image and where the outputs go (picklable, for workers)."""

    kind: Kind
    extractor: FeatureExtractor
    out: str  # extract: a folder; classify: the results CSV
    classifier: DataLocation | None = None
    threshold: float = 0.0
    overwrite: bool = False
    settings: RuntimeSettings = field(default_factory=RuntimeSettings)
    policy: StoragePolicy = ALLOW_ALL
    shard_label: str = ""  # names this shard's summary, so shards sharing a folder keep theirs

    @classmethod
    def extract(cls, extractor: FeatureExtractor, out: str | Path, **options: Any) -> BulkTask:
        """Feature files into the folder `out`."""
        return cls("extract", extractor, _out(out), **options)

    @classmethod
    def classify(
        cls,
        extractor: FeatureExtractor,
        classifier: DataLocation,
        out: str | Path,
        threshold: float,
        **options: Any,
    ) -> BulkTask:
        """A results CSV at `out`, each point scored by the classifier."""
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInputError(f"threshold {threshold}: expected a score between 0 and 1")
        return cls("classify", extractor, _out(out), classifier=classifier, threshold=threshold, **options)

    @property
    def work_dir(self) -> str:
        """Where per-image outputs and the summary go."""
        return self.out if self.kind == "extract" else self.out + ".parts"

    def output(self, item: BulkImage) -> DataLocation:
        """The location of an image's output (its feature file, or its scores part)."""
        if self.kind == "extract":
            return DataLocation("filesystem", str(feature_path(self.work_dir, item.file_name)))
        return DataLocation("filesystem", os.path.join(self.work_dir, item.file_name + SCORES_SUFFIX))

    @property
    def summary_location(self) -> DataLocation:
        stem, ext = os.path.splitext(SUMMARY_NAME)
        return DataLocation("filesystem", os.path.join(self.work_dir, stem + self.shard_label + ext))


def build_task(
    kind: str,
    weights: str | Path,
    out: str | Path,
    *,
    classifier: str | None = None,
    threshold: float = 0.0,
    shard: int = 0,
    shards: int = 1,
    overwrite: bool = False,
) -> BulkTask:
    """The task of the shell and the batch entry point: a local weights file, a classifier path
    or s3:// name; a shard's summary (and results CSV) carry the shard in their names."""
    label = shard_label(shard, shards)
    extractor = weights_extractor(weights)
    if kind == "extract":
        return BulkTask.extract(extractor, out, overwrite=overwrite, shard_label=label)
    if kind != "classify":
        raise InvalidInputError(f"bulk task {kind!r}: expected extract or classify")
    if classifier is None:
        raise InvalidInputError("bulk classify needs a classifier")
    path = Path(out)
    return BulkTask.classify(
        extractor,
        location_for(classifier),
        path.with_name(path.stem + label + path.suffix),
        threshold,
        overwrite=overwrite,
        shard_label=label,
    )


def _out(out: str | Path) -> str:
    return str(Path(out).resolve())


def task_runtime(task: BulkTask) -> Runtime:
    """A runtime of `task`'s settings and policy, for one engine run (or one Ray actor) to hold
    and close: its networks stay loaded for every image of the run and go with it."""
    return Runtime(task.settings, policy=task.policy)


@contextlib.contextmanager
def held_runtime(task: BulkTask, given: Runtime | None = None) -> Iterator[Runtime]:
    """`given` as it is, or a `task_runtime` closed when the block ends."""
    if given is not None:
        yield given
        return
    rt = task_runtime(task)
    try:
        yield rt
    finally:
        rt.close()


# ---------------------------------------------------------------- per image


@dataclass
class Outcome:
    """What happened to one image."""

    name: str
    ok: bool
    points: int = 0
    seconds: float = 0.0
    error: str = ""
    skipped: bool = False

    def as_dict(self, output: str) -> dict[str, Any]:
        if not self.ok:
            return {"ok": False, "error": self.error}
        entry: dict[str, Any] = {"ok": True, "points": self.points, "output": output}
        if self.skipped:
            entry["skipped"] = True
        else:
            entry["seconds"] = round(self.seconds, 3)
        return entry


def describe_error(exc: BaseException) -> str:
    """One line for the summary: the library's message, or the type too for anything else."""
    if isinstance(exc, SpacerError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def image_job(task: BulkTask, item: BulkImage) -> pipeline.ImageJob:
    """The pipeline job of one image: features stored (extract) or scored (classify)."""
    return pipeline.ImageJob(
        task.extractor,
        item.rowcols,
        item.location,
        name=item.name,
        feature_loc=task.output(item) if task.kind == "extract" else None,
        classifier_loc=task.classifier if task.kind == "classify" else None,
    )


def prepare_image(task: BulkTask, item: BulkImage, rt: Runtime) -> pipeline.Prepared:
    """Read, check and cut one image (`pipeline.prepare`), under `rt`."""
    with rt.activate():
        return pipeline.prepare(image_job(task, item))


def network(task: BulkTask, rt: Runtime) -> NetworkSpec | None:
    """The extractor's network (None for extractors that compute in `prepare_image`)."""
    with rt.activate():
        found = task.extractor.network()
    return None if found is None else found[0]


def image_features(rt: Runtime, net: NetworkSpec, patches: np.ndarray) -> np.ndarray:
    """The network's features of one image's patches, computed in this thread."""
    return rt.features(net, patches)


def record(task: BulkTask, item: BulkImage, result: pipeline.ImageResult) -> Outcome:
    """The outcome of an image the pipeline finished; classify also writes its scores part."""
    if task.kind == "classify":
        assert result.scores is not None and result.classes is not None
        part = {
            "name": item.name,
            "rowcols": [list(rc) for rc in result.rowcols],
            "classes": result.classes,
            "scores": result.scores.tolist(),
            "source": scores_source(task),
        }
        store_bytes(task.output(item), json.dumps(part).encode("utf-8"))
    return Outcome(item.name, True, len(result.rowcols), result.runtime)


def finish_image(
    task: BulkTask, item: BulkImage, prepared: pipeline.Prepared, features: np.ndarray, rt: Runtime
) -> Outcome:
    """Store or score the features (`pipeline.finish`) and record the image."""
    with rt.activate():
        return record(task, item, pipeline.finish(prepared, features))


def failed(item: BulkImage, exc: BaseException) -> Outcome:
    return Outcome(item.name, False, error=describe_error(exc))


def process_image(task: BulkTask, item: BulkImage, rt: Runtime) -> Outcome:
    """One image through `pipeline.run` in this thread; an error becomes a failed Outcome."""
    try:
        with rt.activate():
            return record(task, item, pipeline.run(image_job(task, item)))
    except Exception as exc:  # one image's failure, whatever it is, must not stop a survey
        return failed(item, exc)


# ---------------------------------------------------------------- resume, summary, results


def scores_source(task: BulkTask) -> dict[str, str]:
    """What scores are made with now: the classifier file's sha256 and the extractor and its weights.

    A scores part records this, so a rerun after the classifier or the weights
    changed (another path, or the same path rewritten) scores the image again.
    """
    assert task.classifier is not None
    loc = task.classifier
    if loc.storage_type == "filesystem":
        sha = current().file_hashes.sha256(loc.key)  # remembered per file version: read once per run
    else:
        sha = hashlib.sha256(load_bytes(loc).getvalue()).hexdigest()
    return {"classifier_sha256": sha, **task.extractor.feature_provenance([], []).source()}


def drop_failed_parts(task: BulkTask, items: Sequence[BulkImage], outcomes: Mapping[str, Outcome]) -> None:
    """Remove the scores parts of images that failed in this run, so no later run builds rows from them."""
    if task.kind != "classify":
        return
    for item in items:
        outcome = outcomes.get(item.name)
        if outcome is not None and not outcome.ok:
            with contextlib.suppress(FileNotFoundError):
                os.remove(task.output(item).key)


def split_done(
    task: BulkTask, items: Sequence[BulkImage], rt: Runtime
) -> tuple[list[BulkImage], list[Outcome]]:
    """(images still to do, outcomes of those already done); all to do with overwrite.

    An output counts as done only when it was made for the image's current
    points and by the current extractor and weights, and for scores parts
    also by the current classifier file (its sha256); a feature file of
    unknown origin (pyspacer's) counts as done when its points match.
    Anything else is computed again.
    """
    if task.overwrite:
        return list(items), []
    todo, done = [], []
    with rt.activate():
        now = _current_source(task)
        scoring = _current_scores_source(task) if task.kind == "classify" else None
        for item in items:
            if _output_current(task, item, now, scoring):
                done.append(Outcome(item.name, True, len(item.rowcols), skipped=True))
            else:
                todo.append(item)
    return todo, done


def _current_source(task: BulkTask) -> FeatureProvenance | None:
    """The extractor, weights and precision features would be made with now (None if the weights cannot be read)."""
    try:
        now = task.extractor.feature_provenance([], [])
        found = task.extractor.network()
        precision = current().feature_precision(found[0] if found is not None else None)
        return replace(now, precision=precision)
    except SpacerError:
        return None  # every image is tried again, and fails with its own error


def _current_scores_source(task: BulkTask) -> dict[str, str] | None:
    """`scores_source` now (None if the classifier or the weights cannot be read)."""
    try:
        return scores_source(task)
    except (SpacerError, OSError):
        return None  # every image is tried again, and fails with its own error


def _output_current(
    task: BulkTask,
    item: BulkImage,
    now: FeatureProvenance | None,
    scoring: dict[str, str] | None = None,
) -> bool:
    output = task.output(item)
    if not data_exists(output):
        return False
    rows = [r for r, _ in item.rowcols]
    cols = [c for _, c in item.rowcols]
    try:
        if task.kind == "classify":
            part = json.loads(load_bytes(output).getvalue())
            return (
                scoring is not None
                and part.get("source") == scoring
                and [tuple(rc) for rc in part["rowcols"]] == [tuple(rc) for rc in item.rowcols]
            )
        made = ImageFeatures.load_provenance(output)  # reads the provenance member alone
        if made is None:
            # Unknown origin: only the points can be checked, from the file itself.
            features = ImageFeatures.load(output)
            return bool(
                features.rows is not None
                and features.cols is not None
                and features.rows.tolist() == rows
                and features.cols.tolist() == cols
            )
        return (
            now is not None
            and made.same_source(now)
            and made.precision == now.precision  # fast features are made again for an exact run
            and made.points_sha256 == points_sha256(rows, cols)
        )
    except (SpacerError, ValueError, KeyError, TypeError):
        return False  # an unreadable output is made again


@dataclass
class Summary:
    """The job's outcome: one entry per image, counts, and where things went."""

    task: BulkTask
    engine: str
    items: list[BulkImage]
    outcomes: dict[str, Outcome]
    seconds: float
    results: str | None = None  # the results CSV (classify)
    interrupted: bool = False  # stopped by Ctrl-C: the outputs hold what finished before it

    def counts(self) -> dict[str, int]:
        values = list(self.outcomes.values())
        return {
            "images": len(self.items),
            "ok": sum(o.ok for o in values),
            "failed": sum(not o.ok for o in values),
            "skipped": sum(o.skipped for o in values),
            "points": sum(o.points for o in values if o.ok),
            "points_computed": sum(o.points for o in values if o.ok and not o.skipped),
        }

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task.kind,
            "engine": self.engine,
            **self.counts(),
            "seconds": round(self.seconds, 3),
        }
        if self.results is not None:
            out["results"] = self.results
        if self.interrupted:
            out["interrupted"] = True
        out["outputs"] = {
            item.name: self.outcomes[item.name].as_dict(self.task.output(item).key)
            for item in self.items
            if item.name in self.outcomes
        }
        return out


def write_summary(summary: Summary, rt: Runtime) -> None:
    """`_summary.json` in the work folder, atomically."""
    with rt.activate():
        store_bytes(summary.task.summary_location, json.dumps(summary.as_dict(), indent=1).encode("utf-8"))


def result_rows(
    task: BulkTask,
    items: Sequence[BulkImage],
    outcomes: dict[str, Outcome],
    rt: Runtime,
    given: Mapping[str, Mapping[tuple[int, int], str]] | None = None,
) -> tuple[list[coralnet.ResultRow], list[str]]:
    """The results rows from every image's scores part, in manifest order (images that failed
    left out), and the classifier's classes (empty when no image was scored). A person's labels
    are the manifest's (`BulkImage.labels`) and those in `given`, by image file name, which
    win where both label a point (see `coralnet.result_rows`)."""
    rows: list[coralnet.ResultRow] = []
    classes: list[str] = []
    with rt.activate():
        for item in items:
            outcome = outcomes.get(item.name)
            if outcome is None or not outcome.ok:
                continue
            part = json.loads(load_bytes(task.output(item)).getvalue())
            rowcols = [(int(r), int(c)) for r, c in part["rowcols"]]
            classes = [str(c) for c in part["classes"]]
            labels = {(r, c): label for r, c, label in item.labels}
            labels.update((given or {}).get(item.file_name, {}))
            # CoralNet knows an image by its file name, not by the path the manifest reads it from.
            rows += coralnet.result_rows(
                item.file_name, rowcols, classes, part["scores"], task.threshold, labels
            )
    return rows, classes


def write_results(
    task: BulkTask, items: Sequence[BulkImage], outcomes: dict[str, Outcome], rt: Runtime
) -> str:
    """The results CSV from every image's scores part, in manifest order (images that failed left out)."""
    coralnet.write_results(task.out, result_rows(task, items, outcomes, rt)[0])
    return task.out


def conclude(
    task: BulkTask,
    engine: str,
    items: Sequence[BulkImage],
    outcomes: Iterable[Outcome],
    start: float,
    rt: Runtime,
) -> Summary:
    """Write the results CSV (classify) and the summary of a finished run."""
    by_name = {o.name: o for o in outcomes}
    summary = Summary(task, engine, list(items), by_name, 0.0)
    drop_failed_parts(task, items, by_name)
    if task.kind == "classify":
        summary.results = write_results(task, items, by_name, rt)
    summary.seconds = time.monotonic() - start
    write_summary(summary, rt)
    return summary


class Tally:
    """Counts images and points as outcomes arrive and reports them to a progress callback."""

    def __init__(self, total: int, progress: Progress | None, start: Sequence[Outcome] = ()):
        self.total, self.progress = total, progress
        self.outcomes: list[Outcome] = list(start)
        self.points = sum(o.points for o in self.outcomes)
        self._report()

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.points += outcome.points
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(len(self.outcomes), self.total, self.points)


def default_workers() -> int:
    """Images the local engine works on at once: one per core.

    Each worker takes whole images (read, decode, network, store) and the
    CPU backend runs one single-thread session per core, so the workers keep
    every core on the network while another image is being decoded; measured
    on 2 cores, 1.06x a plain two-thread ONNX Runtime session on the same
    patches against 0.64x for one image at a time.
    """
    return available_cpus()


def local_outcomes(
    task: BulkTask, items: Sequence[BulkImage], rt: Runtime, workers: int | None = None
) -> Generator[Outcome, None, None]:
    """Every image through the pipeline under `rt`, `workers` at a time, each outcome as it finishes.

    Images are started in the order given; a failed image is a failed Outcome, never an error.
    A Ctrl-C starts no further image and raises KeyboardInterrupt once those under way finish.
    """

    def one(item: BulkImage) -> Outcome:
        return process_image(task, item, rt)

    return each_image(one, items, workers or default_workers(), name="bulk-image")


class BulkInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a bulk run; its summary (what finished) was written first.

    A KeyboardInterrupt still, so callers that do not know it stop as on any
    Ctrl-C; the shell prints `message()` and exits with status 130.
    """

    def __init__(self, summary: Summary):
        super().__init__(summary.task.summary_location.key)
        self.summary = summary

    def message(self) -> str:
        counts = self.summary.counts()
        return (
            f"interrupted: {counts['ok']} of {counts['images']} images done"
            f" ({counts['points_computed']} points computed), summary: {self.summary.task.summary_location.key}"
        )


def run(
    task: BulkTask,
    items: Sequence[BulkImage],
    progress: Progress | None = None,
    workers: int | None = None,
    runtime: Runtime | None = None,
) -> Summary:
    """The local engine: every image through the pipeline in this process, `workers` at a time.

    Images are started in manifest order; progress is reported as they finish.
    The run holds `runtime`, or one of its own (`task_runtime`) closed at the end.
    Ctrl-C (KeyboardInterrupt, also from `progress`) starts no further image,
    lets those being worked on finish, writes the summary of what finished
    and raises BulkInterrupted.
    """
    start = time.monotonic()
    with held_runtime(task, runtime) as rt:
        todo, done = split_done(task, items, rt)
        tally = Tally(len(items), progress, done)
        try:
            # Closing the generator on Ctrl-C cancels images not started and waits for those under way.
            with contextlib.closing(local_outcomes(task, todo, rt, workers)) as outcomes:
                for outcome in outcomes:
                    tally.add(outcome)
        except KeyboardInterrupt:
            # Images that finished while the run stopped wrote whole outputs: count them from disk.
            counted = {o.name for o in tally.outcomes}
            late, _ = split_done(task, [i for i in todo if i.name not in counted], rt)
            finished = [
                Outcome(i.name, True, len(i.rowcols)) for i in todo if i.name not in counted and i not in late
            ]
            outcomes_by_name = {o.name: o for o in [*tally.outcomes, *finished]}
            summary = Summary(
                task, "local", list(items), outcomes_by_name, time.monotonic() - start, interrupted=True
            )
            drop_failed_parts(task, items, outcomes_by_name)
            write_summary(summary, rt)  # no results CSV: it would hold only part of the survey
            raise BulkInterrupted(summary) from None
        return conclude(task, "local", items, tally.outcomes, start, rt)
