"""Call logging: one line per RPC with a request id, as text or JSON lines.

`CallLog` follows one call from start to status: it picks the request id
(the client's `x-request-id` metadata when it sent a usable one, else a new
one), returns it in the reply's trailing metadata, counts messages and
stream tokens, and at the end writes the log line and the metrics. Points
are reported by the work itself (`metrics.count_points`) to the call's
`metrics.CallWork`, which `CallLog` makes current; a stream item that fails
while its stream goes on gets a line of its own (`rpc-item ...`) and counts
in the error metric.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from server import metrics
from server.config import LOG_FORMATS

logger = logging.getLogger("server.rpc")

REQUEST_ID_KEY = "x-request-id"
_USABLE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_TOKENS_LOGGED = 8
DEADLINE_SLACK_S = 0.2


def _incoming_id(context: Any) -> str | None:
    try:
        metadata = context.invocation_metadata() or ()
    except Exception:  # no metadata on this context
        return None
    for key, value in metadata:
        if key == REQUEST_ID_KEY and isinstance(value, str) and _USABLE_ID.match(value):
            return value
    return None


class CallLog:
    """What one RPC did; `finish` logs it once and records its metrics."""

    def __init__(self, method: str, context: Any, kind: str):
        self.method = method
        self.context = context
        self.start = time.perf_counter()
        self.id = _incoming_id(context) or uuid.uuid4().hex[:16]
        self.tokens: list[str] = []
        self.received = 0
        self.sent = 0
        self.work = metrics.CallWork(method, self.item_failed)
        metrics.begin_call(self.work)
        self.trailing = ((REQUEST_ID_KEY, self.id),)
        context.set_trailing_metadata(self.trailing)
        metrics.STARTED.labels(method, kind).inc()

    @property
    def points(self) -> int:
        """Points the call's work reported so far."""
        return self.work.points

    def received_one(self, request: Any) -> None:
        self.received += 1
        token = str(getattr(request, "job_token", "") or "")
        if token:
            self.tokens.append(token)

    async def requests(self, iterator: Any) -> AsyncIterator[Any]:
        """Pass a request stream through, counting its messages and tokens."""
        async for request in iterator:
            self.received_one(request)
            yield request

    def sent_one(self, response: Any) -> None:
        self.sent += 1

    def item_failed(self, status: str, error: str, token: str) -> None:
        """Log one stream item that failed while its stream went on, as a call error is logged."""
        fields: dict[str, Any] = {
            "method": self.method,
            "item": True,
            "status": status,
            "token": token or "-",
            "request_id": self.id,
            "error": error,
        }
        text = (
            f"rpc-item method={self.method} status={status} token={quote(fields['token'])}"
            f" id={self.id} error={error!r}"
        )
        logger.info(text, extra={"rpc": fields})

    def cancelled_status(self) -> str:
        """What the client saw: a passed deadline is DEADLINE_EXCEEDED, else CANCELLED."""
        try:
            remaining = self.context.time_remaining()
        except Exception:
            remaining = None
        # The server's deadline starts when the call arrives, a little after the
        # client's, and the client gives up at its own: a cancel that close to
        # the deadline is the deadline.
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"

    def finish_ok(self) -> None:
        """Log a handler that returned normally: OK, unless the client had already given up.

        A stream's reads just end when its client gives up at the deadline, so
        a handler can return normally on a call the client saw fail. Near the
        deadline the line waits for the call's end; a call that ends within
        DEADLINE_SLACK_S of its deadline is logged as DEADLINE_EXCEEDED (an
        approximation: the client's deadline comes slightly before the server's).
        """
        try:
            remaining = self.context.time_remaining()
        except Exception:
            remaining = None
        if remaining is None or remaining > DEADLINE_SLACK_S:
            self.finish("OK")
            return

        def done(context: Any) -> None:
            # A client that gave up at its deadline does not always show as a
            # cancel here; ending within the slack of the deadline counts as missing it.
            late = self.cancelled_status() == "DEADLINE_EXCEEDED"
            self.finish(self.cancelled_status() if context.cancelled() or late else "OK")

        try:
            self.context.add_done_callback(done)
        except Exception:  # a context without callbacks: log what is known now
            self.finish("OK")

    def aborted_status(self) -> str:
        """The code the servicer itself aborted with."""
        try:
            code = self.context.code()
        except Exception:
            code = None
        if isinstance(code, grpc.StatusCode):
            return code.name
        return "UNKNOWN"

    def _token_text(self) -> str:
        if not self.tokens:
            return "-"
        shown = ",".join(self.tokens[:_TOKENS_LOGGED])
        more = len(self.tokens) - _TOKENS_LOGGED
        return f"{shown},...(+{more})" if more > 0 else shown

    def finish(self, status: str, error: str = "") -> None:
        """Log the call's one line and record its metrics."""
        seconds = time.perf_counter() - self.start
        fields: dict[str, Any] = {
            "method": self.method,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "token": self._token_text(),
            "request_id": self.id,
            "received": self.received,
            "sent": self.sent,
            "points": self.points,
        }
        if error:
            fields["error"] = error
        text = (
            f"rpc method={self.method} status={status} duration_ms={seconds * 1000:.1f}"
            f" token={quote(fields['token'])} id={self.id} received={self.received}"
            f" sent={self.sent} points={self.points}"
        )
        if error:
            text += f" error={error!r}"
        logger.info(text, extra={"rpc": fields})
        metrics.record_call(self.method, status, seconds, self.received, self.sent, self.points)


# Control characters (C0, DEL, C1) and Unicode line breaks: a client's text
# holding one could end a log line and forge the next.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def quote(text: str) -> str:
    """A client's text as one quoted value: ``"..."`` with ``\\`` and ``"`` escaped, so no text can
    close the value and add key=value fields of its own to the line."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def escape_controls(text: str) -> str:
    """``text`` with every control character and line break written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(_escape_one, text)


class TextFormatter(logging.Formatter):
    """Text lines where nothing a client sent can start a line of its own.

    The message is escaped (`escape_controls`); a traceback, which may quote
    a client's text, follows with every line indented, so no line of it can
    pass for a log record.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging API)
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 (logging API)
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an RPC's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rpc = getattr(record, "rpc", None)
        if isinstance(rpc, dict):
            out.update(rpc)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger for the server: text lines or JSON lines on stderr."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
