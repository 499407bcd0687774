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
pipeline's), the resume check, the summary and the results CSV. The local
engine (`run`) runs the steps in this process; `spacer_core.bulk.ray_engine` runs
the same steps on Ray Data. Per-image errors are recorded in the summary and
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

import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

from spacer_core import pipeline
from spacer_core.data_classes import DataLocation, FeatureProvenance, ImageFeatures, points_sha256
from spacer_core.exceptions import InvalidInputError, SpacerError
from spacer_core.extractors import FeatureExtractor
from spacer_core.inference.backends import available_cpus, one_session
from spacer_core.inference.network import NetworkSpec
from spacer_core.runtime import Runtime, RuntimeSettings
from spacer_core.storage import ALLOW_ALL, StoragePolicy, data_exists, load_bytes, store_bytes
from spacer_core.survey import coralnet
from spacer_core.survey.workflow import weights_extractor

RowCol = tuple[int, int]
Kind = Literal["extract", "classify"]
# (images done, images in the job, points done) after each image.
Progress = Callable[[int, int, int], None]

FEATURE_SUFFIX = ".featurevector"
SCORES_SUFFIX = ".scores.json"
SUMMARY_NAME = "_summary.json"


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class BulkImage:
    """One image of a manifest: its Name as written, where it is read from, its points."""

    name: str
    location: DataLocation
    rowcols: tuple[RowCol, ...]

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


def plan(manifest: str | Path, shard: int = 0, shards: int = 1) -> list[BulkImage]:
    """The images of a manifest, in the order they first appear; shard `shard` of `shards`.

    Image i (0-based, manifest order) belongs to shard i % shards. Image file
    names must be unique: outputs are named after them.
    """
    if shards < 1 or not 0 <= shard < shards:
        raise InvalidInputError(f"shard {shard} of {shards}: expected 0 <= shard < shards and shards >= 1")
    path = Path(manifest)
    points = coralnet.read_points(path)
    seen: dict[str, str] = {}
    items = []
    for name, rowcols in points.items():
        base = file_name(name)
        if not base:
            raise InvalidInputError(f"{path}: Name {name!r} does not end in a file name")
        if base in seen:
            raise InvalidInputError(
                f"{path}: Names {seen[base]!r} and {name!r} end in the same file name {base!r};"
                " outputs are named after it"
            )
        seen[base] = name
        items.append(BulkImage(name, location_for(name, path.parent), tuple(rowcols)))
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
        suffix = FEATURE_SUFFIX if self.kind == "extract" else SCORES_SUFFIX
        return DataLocation("filesystem", os.path.join(self.work_dir, item.file_name + suffix))

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


_runtimes: dict[tuple[RuntimeSettings, str, str], Runtime] = {}
_runtimes_lock = threading.Lock()


def worker_runtime(task: BulkTask) -> Runtime:
    """The runtime of this process for `task`'s settings and policy, built once (networks stay loaded)."""
    # Keyed by value, not identity: every Ray task unpickles its own copy of the task.
    key = (task.settings, type(task.policy).__qualname__, task.policy.describe())
    with _runtimes_lock:
        found = _runtimes.get(key)
        if found is None:
            found = _runtimes[key] = Runtime(task.settings, policy=task.policy)
        return found


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


def prepare_image(task: BulkTask, item: BulkImage) -> pipeline.Prepared:
    """Read, check and cut one image (`pipeline.prepare`), under the worker runtime."""
    with worker_runtime(task).activate():
        return pipeline.prepare(image_job(task, item))


def network(task: BulkTask) -> NetworkSpec | None:
    """The extractor's network (None for extractors that compute in `prepare_image`)."""
    with worker_runtime(task).activate():
        found = task.extractor.network()
    return None if found is None else found[0]


def image_features(task: BulkTask, net: NetworkSpec, patches: np.ndarray) -> np.ndarray:
    """The network's features of one image's patches, computed in this thread."""
    return worker_runtime(task).features(net, patches)


def finish_image(
    task: BulkTask, item: BulkImage, prepared: pipeline.Prepared, features: np.ndarray
) -> Outcome:
    """Store or score the features (`pipeline.finish`); classify also writes the image's part."""
    with worker_runtime(task).activate():
        result = pipeline.finish(prepared, features)
        if task.kind == "classify":
            assert result.scores is not None and result.classes is not None
            part = {
                "name": item.name,
                "rowcols": [list(rc) for rc in result.rowcols],
                "classes": result.classes,
                "scores": result.scores.tolist(),
            }
            store_bytes(task.output(item), json.dumps(part).encode("utf-8"))
    return Outcome(item.name, True, len(result.rowcols), result.runtime)


def failed(item: BulkImage, exc: BaseException) -> Outcome:
    return Outcome(item.name, False, error=describe_error(exc))


def process_image(task: BulkTask, item: BulkImage) -> Outcome:
    """All steps of one image in this thread; an error becomes a failed Outcome."""
    try:
        prepared = prepare_image(task, item)
        features = prepared.features
        if features is None:
            assert prepared.net is not None and prepared.patches is not None
            features = image_features(task, prepared.net, prepared.patches)
            prepared.patches = None
        return finish_image(task, item, prepared, features)
    except Exception as exc:  # one image's failure, whatever it is, must not stop a survey
        return failed(item, exc)


# ---------------------------------------------------------------- resume, summary, results


def split_done(task: BulkTask, items: Sequence[BulkImage]) -> tuple[list[BulkImage], list[Outcome]]:
    """(images still to do, outcomes of those already done); all to do with overwrite.

    An output counts as done only when it was made for the image's current
    points and, for feature files, by the current extractor and weights; a
    feature file of unknown origin (pyspacer's) counts as done when its points
    match. Anything else is computed again.
    """
    if task.overwrite:
        return list(items), []
    todo, done = [], []
    with worker_runtime(task).activate():
        current = _current_source(task)
        for item in items:
            if _output_current(task, item, current):
                done.append(Outcome(item.name, True, len(item.rowcols), skipped=True))
            else:
                todo.append(item)
    return todo, done


def _current_source(task: BulkTask) -> FeatureProvenance | None:
    """The extractor and weights features would be made with now (None if the weights cannot be read)."""
    try:
        return task.extractor.feature_provenance([], [])
    except SpacerError:
        return None  # every image is tried again, and fails with its own error


def _output_current(task: BulkTask, item: BulkImage, current: FeatureProvenance | None) -> bool:
    output = task.output(item)
    if not data_exists(output):
        return False
    rows = [r for r, _ in item.rowcols]
    cols = [c for _, c in item.rowcols]
    try:
        if task.kind == "classify":
            part = json.loads(load_bytes(output).getvalue())
            return bool([tuple(rc) for rc in part["rowcols"]] == [tuple(rc) for rc in item.rowcols])
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
            current is not None
            and made.same_source(current)
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


def write_summary(summary: Summary) -> None:
    """`_summary.json` in the work folder, atomically."""
    with worker_runtime(summary.task).activate():
        store_bytes(summary.task.summary_location, json.dumps(summary.as_dict(), indent=1).encode("utf-8"))


def write_results(task: BulkTask, items: Sequence[BulkImage], outcomes: dict[str, Outcome]) -> str:
    """The results CSV from every image's scores part, in manifest order (images that failed left out)."""
    rows: list[coralnet.ResultRow] = []
    with worker_runtime(task).activate():
        for item in items:
            outcome = outcomes.get(item.name)
            if outcome is None or not outcome.ok:
                continue
            part = json.loads(load_bytes(task.output(item)).getvalue())
            rowcols = [(int(r), int(c)) for r, c in part["rowcols"]]
            rows += coralnet.result_rows(
                item.name, rowcols, [str(c) for c in part["classes"]], part["scores"], task.threshold
            )
    coralnet.write_results(task.out, rows)
    return task.out


def conclude(
    task: BulkTask, engine: str, items: Sequence[BulkImage], outcomes: Iterable[Outcome], start: float
) -> Summary:
    """Write the results CSV (classify) and the summary of a finished run."""
    by_name = {o.name: o for o in outcomes}
    summary = Summary(task, engine, list(items), by_name, 0.0)
    if task.kind == "classify":
        summary.results = write_results(task, items, by_name)
    summary.seconds = time.monotonic() - start
    write_summary(summary)
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
    task: BulkTask, items: Sequence[BulkImage], progress: Progress | None = None, workers: int | None = None
) -> Summary:
    """The local engine: every image through the pipeline in this process, `workers` at a time.

    Images are started in manifest order; progress is reported as they finish.
    Ctrl-C (KeyboardInterrupt, also from `progress`) starts no further image,
    lets those being worked on finish, writes the summary of what finished
    and raises BulkInterrupted.
    """
    start = time.monotonic()
    todo, done = split_done(task, items)
    outcomes: list[Outcome] = list(done)
    try:
        tally = Tally(len(items), progress, done)
        outcomes = tally.outcomes
        count = max(1, min(workers or default_workers(), len(todo)))
        if count == 1:
            for item in todo:
                tally.add(process_image(task, item))
        else:
            _run_pool(task, todo, count, tally)
    except KeyboardInterrupt:
        summary = Summary(task, "local", list(items), {o.name: o for o in outcomes}, 0.0, interrupted=True)
        summary.seconds = time.monotonic() - start
        write_summary(summary)  # no results CSV: it would hold only part of the survey
        raise BulkInterrupted(summary) from None
    return conclude(task, "local", items, tally.outcomes, start)


def _run_pool(task: BulkTask, todo: Sequence[BulkImage], count: int, tally: Tally) -> None:
    def one(item: BulkImage) -> Outcome:
        with one_session():  # each worker keeps to one core's session
            return process_image(task, item)

    pool = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="bulk-image")
    futures = [pool.submit(one, item) for item in todo]
    tallied: set[concurrent.futures.Future[Outcome]] = set()
    try:
        # process_image turns every error into a failed Outcome, so one image never stops the rest.
        for future in concurrent.futures.as_completed(futures):
            tallied.add(future)
            tally.add(future.result())
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        try:
            # Images under way finish (outputs are written whole); the rest never start.
            concurrent.futures.wait(futures)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: summarise what is finished now
        for future in futures:
            if future.done() and not future.cancelled() and future not in tallied:
                tally.outcomes.append(future.result())
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
