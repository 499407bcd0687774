"""How the shell words a failure: one line on stderr, in terms of the user's files.

A local run (a CSV form, bulk, the demo in process) prints the library's own
message, which already names the file, row or point at fault. The pyspacer
message form prefixes an error code, the one a server answers for the same
message, so scripts that run messages locally or remotely match the same
words. A failed call to a server is told in plain words from its status
details. Anything else is a bug: one line, and the traceback at DEBUG level.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from spacer_core import crop
from spacer_core import exceptions as spacer_exc

logger = logging.getLogger("shell")


class UsageError(Exception):
    """Arguments that do not fit together; the parser prints it with the usage (exit 2)."""


# Library categories, most specific first: (code of the message form, what it means in words).
_CATEGORIES: tuple[tuple[type[BaseException], str], ...] = (
    (spacer_exc.DataNotFoundError, "NOT_FOUND"),
    (spacer_exc.AccessDeniedError, "PERMISSION_DENIED"),
    (spacer_exc.ResourceLimitError, "RESOURCE_EXHAUSTED"),
    (spacer_exc.PreconditionError, "FAILED_PRECONDITION"),
    (spacer_exc.InvalidInputError, "INVALID_ARGUMENT"),
    (spacer_exc.UnavailableError, "UNAVAILABLE"),
    (spacer_exc.DeadlineExceededError, "DEADLINE_EXCEEDED"),
    (crop.ImageDecodeError, "INVALID_ARGUMENT"),
    (crop.PatchError, "INVALID_ARGUMENT"),
)

# What a server's answer means, for a person reading the shell's output.
_PLAIN = {
    "NOT_FOUND": "found no such data",
    "PERMISSION_DENIED": "refused access",
    "RESOURCE_EXHAUSTED": "is out of capacity or the request is too large",
    "FAILED_PRECONDITION": "cannot use the data as it is",
    "INVALID_ARGUMENT": "rejected the input",
    "UNAVAILABLE": "could not be reached",
    "DEADLINE_EXCEEDED": "did not answer in time",
    "CANCELLED": "cancelled the call",
    "UNIMPLEMENTED": "does not offer this call",
    "INTERNAL": "failed internally",
}


def _url_code(exc: spacer_exc.URLDownloadError) -> str:
    if exc.http_status == 404:
        return "NOT_FOUND"
    if exc.http_status is not None and 400 <= exc.http_status < 500:
        return "FAILED_PRECONDITION"
    return "UNAVAILABLE"


def error_code(exc: BaseException) -> str | None:
    """The code of a library error (as a server would answer it); None for anything else."""
    if isinstance(exc, spacer_exc.URLDownloadError) and not isinstance(exc, spacer_exc.AccessDeniedError):
        return _url_code(exc)
    if isinstance(exc, crop.InternalCropError):
        return None
    for category, code in _CATEGORIES:
        if isinstance(exc, category):
            return code
    return None


def _rpc_error(exc: BaseException) -> Any:
    """exc as a grpc.RpcError, or None; grpc is only looked at once something imported it."""
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(exc, grpc.RpcError):
        return exc
    return None


def describe_rpc(exc: Any) -> str:
    """A failed gRPC call in words: what the server did, its status name, and its details."""
    code = exc.code().name
    return f"the server {_PLAIN.get(code, 'failed')} ({code}): {exc.details()}"


def is_permission_denied(exc: BaseException) -> bool:
    """Whether exc is a server's refusal to read or write a file."""
    rpc = _rpc_error(exc)
    return rpc is not None and rpc.code().name == "PERMISSION_DENIED"


def describe(exc: BaseException) -> str:
    """One line for a failed local or remote run, without gRPC status names for local errors."""
    rpc = _rpc_error(exc)
    if rpc is not None:
        return describe_rpc(rpc)
    if isinstance(exc, spacer_exc.SpacerError | ValueError):
        # Library errors, and the survey's CSV and step errors (ValueErrors), name their file.
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    logger.debug("unexpected error", exc_info=exc)
    return f"internal error ({type(exc).__name__}: {exc}); run with --log-level DEBUG for the traceback"


def describe_message_error(exc: BaseException, source: str) -> str:
    """`CODE: message` for a failed pyspacer message, the message naming its file."""
    code = error_code(exc)
    if code is None:
        logger.debug("unexpected error in %s", source, exc_info=exc)
        return f"INTERNAL: internal error ({type(exc).__name__}: {exc}); run with --log-level DEBUG"
    text = str(exc)
    if source not in text:
        text = f"{source}: {text}"
    return f"{code}: {text}"


def report(command: str, exc: BaseException) -> int:
    """Print the one failure line of `spacer command` and give its exit status (1)."""
    print(f"spacer {command}: {describe(exc)}", file=sys.stderr)
    return 1
