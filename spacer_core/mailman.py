"""Batch-job entry points.

`python -m spacer_core.mailman env_job`: AWS Batch (or any scheduler) sets
`JOB_MSG_LOC` to the job's DataLocation as JSON and, optionally,
`RES_MSG_LOC` to where the JobReturnMsg JSON goes; one job, one message.

`python -m spacer_core.mailman bulk_job`: one shard of a manifest per job,
for AWS Batch array jobs. `BULK_TASK` (extract or classify), `BULK_WEIGHTS`,
`BULK_MANIFEST`, `BULK_OUT`, and for classify `BULK_CLASSIFIER` and
`BULK_THRESHOLD` (default 0.85) say what to do; `AWS_BATCH_JOB_ARRAY_INDEX`
(set by Batch) picks the shard and `BULK_SHARDS` or `AWS_BATCH_JOB_ARRAY_SIZE`
(set them to the array size) the shard count. Shard i does images i, i + n,
... of the manifest; its summary (and results CSV) name the shard. Images
already done are skipped, so a retried array child resumes. Exit status 1
when any image failed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from io import BytesIO

from spacer_core import config
from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import ConfigError, InvalidInputError
from spacer_core.messages import JobMsg
from spacer_core.storage import storage_factory
from spacer_core.tasks import process_job

logger = logging.getLogger(__name__)


def _location_from_env(name: str) -> DataLocation | None:
    raw = os.getenv(name)
    if raw is None:
        return None
    try:
        return DataLocation.deserialize(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{name} is not a DataLocation in JSON form: {raw!r} ({exc})") from exc


def env_job() -> int:
    """Run the job named by JOB_MSG_LOC; write its JobReturnMsg to RES_MSG_LOC if set."""
    job_loc = _location_from_env("JOB_MSG_LOC")
    if job_loc is None:
        raise ConfigError("JOB_MSG_LOC env. variable not set. Can not process job.")
    logger.info("Received job from %s", job_loc.key)

    with config.log_entry_and_exit("job message loading"):
        job_msg = JobMsg.load(job_loc)
    try:
        result = process_job(job_msg).serialize()
    except Exception as exc:
        # process_job handles task failures itself; this catches malformed jobs.
        result = {
            "original_job": job_msg.serialize(),
            "ok": False,
            "results": None,
            "error_message": "Error deserializing message: " + repr(exc),
        }

    result_loc = _location_from_env("RES_MSG_LOC")
    if result_loc is not None:
        with config.log_entry_and_exit(f"writing result to {result_loc.key}"):
            storage = storage_factory(result_loc.storage_type, result_loc.bucket_name)
            storage.store(result_loc.key, BytesIO(json.dumps(result).encode("utf-8")))
    return 0 if result["ok"] else 1


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        raw = os.getenv(name)
        if raw is not None and raw.strip():
            if not raw.strip().isdigit():
                raise InvalidInputError(f"{name}={raw!r}: expected a whole number >= 0")
            return int(raw)
    return default


def _env(name: str, default: str | None = None) -> str:
    value = os.getenv(name, default)
    if value is None or not value.strip():
        raise ConfigError(f"{name} env. variable not set. Can not run the bulk job.")
    return value


def array_shard() -> tuple[int, int]:
    """(shard, shards) of this array child: AWS_BATCH_JOB_ARRAY_INDEX of BULK_SHARDS / AWS_BATCH_JOB_ARRAY_SIZE."""
    shards = _env_int(("BULK_SHARDS", "AWS_BATCH_JOB_ARRAY_SIZE"), 1)
    shard = _env_int(("AWS_BATCH_JOB_ARRAY_INDEX",), 0)
    if shards < 1 or shard >= shards:
        raise InvalidInputError(f"array index {shard} with {shards} shards: expected 0 <= index < shards")
    return shard, shards


def bulk_job() -> int:
    """Run this array child's shard of the manifest named by the BULK_* variables."""
    from spacer_core.bulk import local as bulk

    shard, shards = array_shard()
    kind = _env("BULK_TASK")
    task = bulk.build_task(
        kind,
        _env("BULK_WEIGHTS"),
        _env("BULK_OUT"),
        classifier=os.getenv("BULK_CLASSIFIER") if kind == "classify" else None,
        threshold=float(_env("BULK_THRESHOLD", "0.85")),
        shard=shard,
        shards=shards,
    )
    items = bulk.plan(_env("BULK_MANIFEST"), shard, shards)
    logger.info("Shard %d of %d: %d images", shard, shards, len(items))
    summary = bulk.run(task, items)
    counts = summary.counts()
    logger.info("Shard %d of %d: %s; summary at %s", shard, shards, counts, task.summary_location.key)
    return 1 if counts["failed"] else 0


_ENTRY_POINTS = {"env_job": env_job, "bulk_job": bulk_job}


def main(argv: list[str] | None = None) -> int:
    """`python -m spacer_core.mailman env_job|bulk_job`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in _ENTRY_POINTS:
        print("usage: python -m spacer_core.mailman env_job|bulk_job", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _ENTRY_POINTS[args[0]]()


if __name__ == "__main__":
    sys.exit(main())
