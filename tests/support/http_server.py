"""A real HTTP server on 127.0.0.1 for url-storage tests.

    def test_x(http_server):
        url = http_server.add("/a.jpg", b"...")          # 200 with that body
        http_server.add("/slow", b"x", delay=2.0)         # waits before answering
        http_server.add("/cut", b"abc", claim_length=10)  # promises 10 bytes, sends 3
        http_server.add("/stall", b"abcd", stall=2.0)     # sends half, pauses, sends the rest
        http_server.add("/r", b"", status=302, location="http://10.0.0.1/")  # a redirect
        http_server.add("/eof", b"abc", send_length=False)  # body ends when the connection does
        # any other path answers 404

The fixture lets url storage reach this loopback server (URLStorage's
default rules refuse private addresses) for the length of the test.

Handlers run in their own threads, so a slow response does not block others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class _Route:
    body: bytes
    status: int = 200
    delay: float = 0.0
    claim_length: int | None = None
    stall: float = 0.0
    location: str | None = None
    send_length: bool = True


class LoopbackHTTPServer:
    """Serves registered paths; counts the requests each path received and keeps their headers."""

    def __init__(self) -> None:
        self.routes: dict[str, _Route] = {}
        self.hits: dict[str, int] = {}
        # (method, path, headers) of every request, in arrival order.
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, send_body: bool) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                server.requests.append((self.command, self.path, dict(self.headers.items())))
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                time.sleep(route.delay)
                self.send_response(route.status)
                if route.location is not None:
                    self.send_header("Location", route.location)
                if route.send_length:
                    self.send_header("Content-Length", str(route.claim_length or len(route.body)))
                self.end_headers()
                if send_body:
                    half = len(route.body) // 2 if route.stall else len(route.body)
                    self.wfile.write(route.body[:half])
                    self.wfile.flush()
                    if route.stall:
                        time.sleep(route.stall)
                        self.wfile.write(route.body[half:])
                        self.wfile.flush()
                if route.claim_length:
                    # Drop the connection before the promised length arrives.
                    self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._answer(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(send_body=False)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        host, port = self._httpd.server_address[:2]
        self.base_url = f"http://{host}:{port}"

    def add(self, path: str, body: bytes, **options: object) -> str:
        """Serve ``body`` at ``path``; return its full URL."""
        self.routes[path] = _Route(body, **options)  # type: ignore[arg-type]
        return self.base_url + path

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def http_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHTTPServer]:
    """A LoopbackHTTPServer running for one test, reachable through url storage."""
    from spacer_core.storage import URLStorage
    from spacer_core.urlfetch import UrlRules

    monkeypatch.setattr(URLStorage, "default_rules", UrlRules(allow_private=True))
    server = LoopbackHTTPServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
