"""HTTP(S) downloads for ``url`` DataLocations that a client cannot turn against the host.

A URL in a request is chosen by whoever sent it, so a fetch must not become
a way to read local files (``file:``), to reach services only the host can
see (loopback, private networks, cloud metadata endpoints) or to exhaust
memory and time. :func:`fetch` therefore:

- accepts ``http`` and ``https`` only;
- resolves the host once, refuses it when any of its addresses is not a
  public unicast address (unless ``UrlRules.allow_private``; cloud metadata
  addresses are refused even then), and connects to the address it
  checked, so a DNS answer cannot change in between;
- follows redirects itself, checking every hop the same way;
- stops at ``UrlRules.max_bytes`` of body and ``UrlRules.total_timeout``
  seconds, besides the per-read ``timeout``.

Failures raise URLDownloadError with pyspacer's messages ("Failed to
download from the URL '...'." / "Couldn't read the full response ...");
refusals raise its subclass URLRefusedError. Every one carries, as its
``location``, the URL the caller asked for; the message names the hop that
failed, which after a redirect may be another URL.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from urllib.error import HTTPError
from urllib.parse import urljoin, urlsplit

from spacer_core.exceptions import MalformedURLError, URLDownloadError, URLRefusedError

logger = logging.getLogger(__name__)

# Cloud instance-metadata endpoints (AWS, GCP, Azure use the IPv4 one).
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_TOTAL_TIMEOUT = 300.0
DEFAULT_MAX_REDIRECTS = 5

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 16

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class UrlRules:
    """What a URL fetch may reach and how much it may read.

    allow_private: also fetch from loopback, private, link-local and other
        non-public addresses (for a trusted caller on its own network);
        cloud metadata addresses stay refused.
    max_bytes: largest body accepted (default 256 MiB: well above any
        survey image or classifier CoralNet stores).
    total_timeout: seconds for the whole download, redirects included.
    max_redirects: redirects followed before giving up.
    """

    allow_private: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT
    max_redirects: int = DEFAULT_MAX_REDIRECTS


def _unmapped(address: Address) -> Address:
    """The IPv4 address an IPv6 one carries and reaches, if any: ::ffff:127.0.0.1 (mapped),
    2002:7f00:1:: (6to4) and Teredo's client all lead to 127.0.0.1."""
    if isinstance(address, ipaddress.IPv6Address):
        teredo = address.teredo
        for inner in (address.ipv4_mapped, address.sixtofour, teredo[1] if teredo else None):
            if inner is not None:
                return inner
    return address


def address_refusal(address: Address) -> str | None:
    """Why ``address`` may not be fetched from without allow_private; None when it may."""
    address = _unmapped(address)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not address.is_global:
        return "not a public address"
    return None


_NO_SCHEME = "the URL has no scheme (such as https://)"


def url_syntax_problem(url: str) -> str | None:
    """What makes ``url`` no URL to fetch (no scheme, no host, a bad port); None when it is one.

    Whether the scheme is allowed is a policy question, answered elsewhere.
    """
    parts = urlsplit(url)
    if not parts.scheme:
        return _NO_SCHEME
    if parts.scheme not in ("http", "https"):
        return None
    try:
        port = parts.port
    except ValueError:
        return "the URL's port is not a number from 0 to 65535"
    del port
    if not parts.hostname:
        return "the URL has no host"
    return None


def _resolve(host: str, port: int, rules: UrlRules, url: str, requested: str) -> str:
    """One checked address of ``host`` (from ``url``, a hop of ``requested``) to connect to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise URLDownloadError(
            f"Failed to download from the URL '{url}'.",
            err,
            location=requested,
            reason=f"the host name {host!r} could not be resolved",
        ) from err
    addresses = [str(info[4][0]) for info in infos]
    # Every address must pass: a host answering with one public and one
    # private address could otherwise be steered to the private one.
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if _unmapped(address) in METADATA_ADDRESSES:
            # Never a data source, and the classic target of a forged URL:
            # refused even when private addresses are allowed.
            why: str | None = "a cloud metadata address"
        else:
            why = None if rules.allow_private else address_refusal(address)
        if why is not None:
            raise _refusal(url, host, text, why, requested)
    return addresses[0]


def _refusal(url: str, host: str, address: str, why: str, requested: str) -> URLRefusedError:
    """The refusal of ``url``; for a host name it says neither the address nor its kind.

    What an internal name resolves to is the server's network layout, so a
    client learns only that the name leads somewhere not allowed; the log
    has the details. A literal address was the client's own input.
    """
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        logger.warning("refused url %r: host %r resolves to %s, %s", url, host, address, why)
        return URLRefusedError(
            f"Refused to download from the URL '{url}': its host name resolves to an address this server does"
            " not fetch from.",
            PermissionError(f"{host} resolves to an address that is not allowed"),
            location=requested,
            reason="",
        )
    return URLRefusedError(
        f"Refused to download from the URL '{url}': its host resolves to {why}.",
        PermissionError(f"{host} is {why}"),
        location=requested,
    )


def _connection(
    scheme: str, host: str, port: int, address: str, timeout: float
) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=timeout)

    # The Host header and TLS server name stay ``host``; only the socket is
    # pinned to the address that was checked.
    def pinned(
        _addr: tuple[str, int], timeout: float, source: tuple[str, int] | None = None
    ) -> socket.socket:
        return socket.create_connection((address, port), timeout, source)

    conn._create_connection = pinned  # type: ignore[attr-defined]
    return conn


class _Deadline:
    def __init__(self, seconds: float, idle: float):
        self.end = time.monotonic() + seconds
        self.idle = idle

    def timeout(self) -> float:
        """The socket timeout for the next step: the idle limit or what is left, if less."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the download took longer than its total time limit")
        return min(self.idle, left)


def _open(
    url: str, method: str, rules: UrlRules, deadline: _Deadline
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send the request, following redirects; the final connection and response."""
    current = url
    for _hop in range(rules.max_redirects + 1):
        parts = urlsplit(current)
        problem = url_syntax_problem(current)
        if problem is not None:
            # pyspacer's wording for str(); the reason is what a client is told.
            original = ValueError(
                f"unknown url type: {current!r}" if problem == _NO_SCHEME else "no host in URL"
            )
            if current == url:
                raise MalformedURLError(
                    f"Failed to download from the URL '{url}'.", original, location=url, reason=problem
                )
            raise URLDownloadError(
                f"Failed to download from the URL '{url}'.",
                original,
                location=url,
                reason=f"it redirected to {current!r}, which {problem.removeprefix('the URL ')}",
            )
        if parts.scheme not in ("http", "https"):
            raise URLRefusedError(
                f"Refused to download from the URL '{current}': only http and https URLs are allowed.",
                ValueError(f"unsupported URL scheme {parts.scheme!r}"),
                location=url,
            )
        host, port = parts.hostname or "", parts.port
        port = port or (443 if parts.scheme == "https" else 80)
        address = _resolve(host, port, rules, current, url)
        # Each socket operation waits at most the idle timeout (or what is left of the total).
        conn = _connection(parts.scheme, host, port, address, deadline.timeout())
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request(method, path, headers={"User-Agent": "spacer", "Accept-Encoding": "identity"})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise URLDownloadError(
                f"Failed to download from the URL '{current}'.",
                err,
                location=url,
                reason="the connection failed or the server did not answer",
            ) from err
        location = response.getheader("Location")
        if response.status in _REDIRECTS and location:
            conn.close()
            current = urljoin(current, location)
            continue
        if response.status >= 400:
            conn.close()
            error = HTTPError(current, response.status, response.reason, response.msg, None)
            raise URLDownloadError(
                f"Failed to download from the URL '{url}'.",
                error,
                location=url,
                reason=f"the server answered HTTP {response.status}",
            )
        return conn, response
    raise URLDownloadError(
        f"Failed to download from the URL '{url}'.",
        ValueError(f"more than {rules.max_redirects} redirects"),
        location=url,
        reason=f"more than {rules.max_redirects} redirects",
    )


def _read_body(response: http.client.HTTPResponse, rules: UrlRules, deadline: _Deadline, url: str) -> bytes:
    def incomplete(err: BaseException) -> URLDownloadError:
        why = str(err) if err is too_big else "the connection broke off before the whole body arrived"
        return URLDownloadError(
            f"Couldn't read the full response from the URL '{url}'.", err, location=url, reason=why
        )

    too_big = ValueError(f"the body is larger than the limit of {rules.max_bytes} bytes")
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > rules.max_bytes:
        raise incomplete(too_big)
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            # read1 makes one socket read, which the idle timeout bounds; the
            # deadline is checked between reads, so a body trickled in byte by
            # byte ends within total_timeout plus one idle timeout.
            deadline.timeout()
            chunk = response.read1(min(_CHUNK, rules.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > rules.max_bytes:
                raise incomplete(too_big)
    except (OSError, http.client.HTTPException) as err:
        raise incomplete(err) from err
    if response.length:  # the connection ended before the promised length
        raise incomplete(http.client.IncompleteRead(b"".join(chunks), response.length))
    return b"".join(chunks)


def fetch(url: str, rules: UrlRules = UrlRules(), timeout: float = 20.0) -> bytes:
    """The body at ``url`` under ``rules``; ``timeout`` bounds connecting and each idle read."""
    deadline = _Deadline(rules.total_timeout, timeout)
    try:
        conn, response = _open(url, "GET", rules, deadline)
    except TimeoutError as err:
        raise URLDownloadError(
            f"Failed to download from the URL '{url}'.",
            err,
            location=url,
            reason="the download took longer than its time limit",
        ) from err
    try:
        return _read_body(response, rules, deadline, url)
    finally:
        conn.close()


def exists(url: str, rules: UrlRules = UrlRules(), timeout: float = 20.0) -> bool:
    """Best effort: True when a HEAD request (redirects checked as for fetch) succeeds."""
    try:
        conn, _response = _open(url, "HEAD", rules, _Deadline(rules.total_timeout, timeout))
    except (URLDownloadError, TimeoutError):
        return False
    conn.close()
    return True
