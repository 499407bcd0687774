"""The Ray engine of bulk work: the library pipeline's steps as one Ray Data job.

    summary = bulk_ray.run(task, bulk.plan("points.csv"), RayOptions(address="auto"))

Three stages, each a step of `spacer_core.bulk.local` (the local engine runs the same ones):

1. CPU tasks: read the image through storage, check it and decode + crop its
   patches in Rust (`bulk.prepare_image`).
2. An actor pool (`map_batches` with a callable class): each actor builds its
   runtime once and keeps the compiled network loaded; one actor per GPU, or
   per few CPU cores (`bulk.image_features`). An actor that dies is restarted
   and its batch retried (Ray Data's defaults for actor pools: unlimited
   restarts and retries, which the tests rely on).
3. CPU tasks: store the features, or score them and write the image's part
   (`bulk.finish_image`).

The driver collects one outcome per image, reports progress, and writes the
summary and the results CSV as the local engine does. Ray is only imported
here; install it with `pip install .[ray]`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from spacer_core import pipeline
from spacer_core.bulk import local as bulk
from spacer_core.bulk.local import BulkImage, BulkTask, Outcome, Progress, Summary
from spacer_core.data_classes import DataLocation
from spacer_core.runtime import Runtime, RuntimeSettings

logger = logging.getLogger(__name__)

_NONE = np.zeros((0,), dtype=np.float32)

# Ray runs the light stages as plain tasks, each unpickling its own copy of the stage, so a
# worker process keeps their runtimes (networks' weight hashes, classifiers) between tasks.
# Bound: a worker serves one bulk job at a time, so two runtimes at most; a third job's
# runtime closes the least recently used one.
STAGE_RUNTIMES = 2
_stage_runtimes: OrderedDict[tuple[RuntimeSettings, str, str], Runtime] = OrderedDict()
_stage_lock = threading.Lock()


def stage_runtime(task: BulkTask) -> Runtime:
    """This worker process's runtime for `task`'s settings and policy (see STAGE_RUNTIMES)."""
    # Keyed by value, not identity: every Ray task unpickles its own copy of the task.
    key = (task.settings, type(task.policy).__qualname__, task.policy.describe())
    with _stage_lock:
        found = _stage_runtimes.get(key)
        if found is None:
            found = _stage_runtimes[key] = bulk.task_runtime(task)
            while len(_stage_runtimes) > STAGE_RUNTIMES:
                _stage_runtimes.popitem(last=False)[1].close()
        _stage_runtimes.move_to_end(key)
        return found


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    address: a cluster to join ("auto", "ray://host:10001", host:port); None
        joins the instance already initialised in this process, else starts a
        local one. actors: network actors; default one per GPU of the cluster,
        else one per `cores_per_actor` CPUs. actor_cpus / actor_gpus: what each
        actor reserves (GPUs default to 1 when the cluster has any). stage_cpus:
        what each read/decode/crop task and each store/score task reserves.
    fault_marker: a file path; the first network call that finds the file
        renames it away and ends its process, a drill for actor recovery.
    """

    address: str | None = None
    actors: int | None = None
    cores_per_actor: int = 4
    actor_cpus: float = 1.0
    actor_gpus: float | None = None
    stage_cpus: float = 0.5
    fault_marker: str | None = None


def run(
    task: BulkTask,
    items: Sequence[BulkImage],
    options: RayOptions | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Run the task on every image not done yet, on Ray; summary and results as `bulk.run`."""
    options = options or RayOptions()
    start = time.monotonic()
    with bulk.held_runtime(task) as rt:  # the driver's reads and writes; each actor holds its own
        todo, done = bulk.split_done(task, items, rt)
        tally = bulk.Tally(len(items), progress, done)
        if todo:
            started = _connect(options.address)
            try:
                for outcome in outcomes(task, todo, options):
                    tally.add(outcome)
            finally:
                if started:
                    ray.shutdown()
        return bulk.conclude(task, "ray", items, tally.outcomes, start, rt)


def _connect(address: str | None) -> bool:
    """Join or start a Ray instance; True when this call started the connection."""
    if ray.is_initialized():
        return False
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return True


def _row(index: int, item: BulkImage) -> dict[str, Any]:
    return {
        "index": index,
        "name": item.name,
        "location": json.dumps(item.location.serialize()),
        "rowcols": json.dumps(item.rowcols),
    }


def _item(row: dict[str, Any]) -> BulkImage:
    loc = DataLocation.deserialize(json.loads(row["location"]))
    return BulkImage(str(row["name"]), loc, tuple((int(r), int(c)) for r, c in json.loads(row["rowcols"])))


def outcomes(task: BulkTask, items: Sequence[BulkImage], options: RayOptions) -> Iterator[Outcome]:
    """One outcome per image as the Ray Data job finishes it (any order)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows images and points instead
    actors, gpus = _pool_size(options)
    rows = [_row(i, item) for i, item in enumerate(items)]
    ds: ray.data.Dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 10_000)))
    # Half a CPU each for the light stages: resource needs unlike the actor's also keep Ray Data
    # from fusing them into the actor, so decoding runs beside the network, not in its process.
    ds = ds.map(_Prepare(task), num_cpus=options.stage_cpus)
    ds = ds.map_batches(
        _Network,
        fn_constructor_args=(task, options.fault_marker),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=options.actor_cpus,
        num_gpus=gpus,
    )
    ds = ds.map(_Finish(task), num_cpus=options.stage_cpus)
    for row in ds.iter_rows():
        yield Outcome(
            str(row["name"]), bool(row["ok"]), int(row["points"]), float(row["seconds"]), str(row["error"])
        )


def _pool_size(options: RayOptions) -> tuple[int, float]:
    """(network actors, GPUs per actor) for the cluster joined."""
    resources = ray.cluster_resources()
    gpus = options.actor_gpus
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    actors = options.actors
    if actors is None:
        if gpus > 0:
            actors = max(1, int(resources.get("GPU", 0) // gpus))
        else:
            actors = max(1, int(resources.get("CPU", 1)) // max(1, options.cores_per_actor))
    needed = actors * options.actor_cpus + 2 * options.stage_cpus
    if needed > resources.get("CPU", 0):
        # Without room for the CPU stages the actors wait for input forever (unless autoscaling adds nodes).
        logger.warning(
            "%d actors x %g CPUs and the CPU stages need %g CPUs; the cluster has %g now",
            actors,
            options.actor_cpus,
            needed,
            resources.get("CPU", 0),
        )
    return actors, gpus


class _Prepare:
    """Stage 1: read, check, decode and crop one image (CPU)."""

    def __init__(self, task: BulkTask):
        self.task = task

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        item = _item(row)
        out: dict[str, Any] = {
            **row,
            "error": "",
            "patches": _NONE,
            "features": _NONE,
            "points": np.zeros((0, 2), dtype=np.int64),
            "start": time.time(),
            "remote": False,
        }
        try:
            prepared = bulk.prepare_image(self.task, item, stage_runtime(self.task))
        except Exception as exc:  # recorded for this image; the job goes on
            out["error"] = bulk.describe_error(exc)
            return out
        out.update(
            points=np.asarray(prepared.rowcols, dtype=np.int64),
            start=prepared.start,
            remote=prepared.loaded_remotely,
        )
        if prepared.features is not None:  # an extractor without a network computed them already
            out["features"] = np.asarray(prepared.features, dtype=np.float32)
        else:
            out["patches"] = prepared.patches
        return out


class _Network:
    """Stage 2: an actor holding the compiled network; features of each image's patches."""

    def __init__(self, task: BulkTask, fault_marker: str | None = None):
        self.task = task
        self.fault_marker = fault_marker
        self.runtime = bulk.task_runtime(task)  # the actor's, for as long as it lives
        self.net = bulk.network(task, self.runtime)
        if self.net is not None:
            self.runtime.backend(self.net)  # compile now, once per actor

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self._drill()
        features = []
        for i in range(len(batch["index"])):
            patches = batch["patches"][i]
            if batch["error"][i] or self.net is None or len(patches) == 0:
                features.append(batch["features"][i])
            else:
                features.append(bulk.image_features(self.runtime, self.net, np.ascontiguousarray(patches)))
        out = {k: v for k, v in batch.items() if k not in ("patches", "features")}
        out["features"] = _column(features)
        return out

    def _drill(self) -> None:
        if self.fault_marker is None:
            return
        try:
            os.rename(self.fault_marker, self.fault_marker + ".taken")
        except OSError:
            return  # no marker, or another actor took it
        logger.warning("fault marker %s found: ending this actor's process", self.fault_marker)
        os._exit(1)


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """A batch column of per-image arrays (their shapes may differ)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


class _Finish:
    """Stage 3: store the features, or score them and write the image's part (CPU)."""

    def __init__(self, task: BulkTask):
        self.task = task

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        item = _item(row)
        out = {"name": item.name, "ok": False, "points": 0, "seconds": 0.0, "error": str(row["error"])}
        if out["error"]:
            return out
        rowcols = [(int(r), int(c)) for r, c in np.asarray(row["points"])]
        prepared = pipeline.Prepared(
            bulk.image_job(self.task, item), rowcols, float(row["start"]), bool(row["remote"])
        )
        try:
            outcome = bulk.finish_image(
                self.task,
                item,
                prepared,
                np.asarray(row["features"], dtype=np.float32),
                stage_runtime(self.task),
            )
        except Exception as exc:  # recorded for this image; the job goes on
            outcome = bulk.failed(item, exc)
        out.update(ok=outcome.ok, points=outcome.points, seconds=outcome.seconds, error=outcome.error)
        return out
