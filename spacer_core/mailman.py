"""Batch-job entry point: read a JobMsg from a DataLocation, run it, store the result.

AWS Batch (or any scheduler) runs `python -m spacer_core.mailman env_job` with
`JOB_MSG_LOC` holding the job's DataLocation as JSON and, optionally,
`RES_MSG_LOC` naming where the JobReturnMsg JSON goes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from io import BytesIO

from spacer_core.exceptions import ConfigError, InvalidInputError
from spacer_core import config
from spacer_core.data_classes import DataLocation
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


def main(argv: list[str] | None = None) -> int:
    """`python -m spacer_core.mailman env_job`."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["env_job"]:
        print("usage: python -m spacer_core.mailman env_job", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return env_job()


if __name__ == "__main__":
    sys.exit(main())
