"""Transport security and client-safe error text.

- :func:`read_token_file` reads the bearer token
  (`server.interceptors.BearerTokenInterceptor` checks it).
- :func:`server_credentials` builds TLS (optionally mutual TLS) credentials
  from PEM files.
- :func:`redact_job_error` turns a failed job's traceback into a message
  that names the failure but not the server's files or objects; the whole
  traceback goes to the log under a reference id the message carries.
"""

from __future__ import annotations

import logging
import re
import site
import sys
import uuid
from pathlib import Path

import grpc

from server.logs import quote

logger = logging.getLogger("server.security")


# ---------------------------------------------------------------- tokens


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace removed); ValueError when empty."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"auth token file {str(path)!r} is empty")
    return token


# ---------------------------------------------------------------- TLS


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca``, clients must present a certificate it signed."""
    chain = Path(cert).read_bytes()
    private_key = Path(key).read_bytes()
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=root, require_client_auth=root is not None
    )


# ---------------------------------------------------------------- error text


def _install_prefixes() -> list[str]:
    import spacer_core

    # The packages themselves, not the folder above them: in a source
    # checkout that folder may be a data root whose paths clients name.
    packages = {str(Path(__file__).resolve().parent), str(Path(spacer_core.__file__).resolve().parent)}
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *packages}
    roots.update(site.getsitepackages())
    # Longest first, so a site-packages path is replaced whole.
    return sorted((r for r in roots if r and r != "/"), key=len, reverse=True)


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def redact(text: str) -> str:
    """``text`` without object reprs and paths inside the server's installation."""
    text = _OBJECT_REPR.sub(lambda m: f"<{m.group(1).rsplit('.', 1)[-1]}>", text)
    for prefix in _install_prefixes():
        text = re.sub(re.escape(prefix) + r"[^\s'\"]*", "<server>", text)
    return text


def _final_message(traceback_text: str) -> str:
    """The 'ExceptionType: message' that ends a formatted traceback."""
    lines = traceback_text.rstrip().splitlines()
    if not lines or not lines[0].startswith("Traceback"):
        return traceback_text.strip()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith("  ")), default=0)
    message = "\n".join(lines[last_frame + 1 :]).strip()
    # 'spacer_core.exceptions.URLDownloadError: ...' -> 'URLDownloadError: ...'
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))", "", message)


def redact_job_error(error_text: str, context: str = "") -> str:
    """A client-safe version of a failed job's error text; the full text is logged under a reference."""
    ref = uuid.uuid4().hex[:12]
    logger.error("job failed ref=%s context=%s\n%s", ref, quote(context or "-"), error_text)
    return f"{redact(_final_message(error_text))} (ref {ref}; details in the server log)"
