"""A local Have I Been Pwned range API for the tests: ``GET <prefix>`` answers ``SUFFIX:COUNT``
lines, with padding entries of count 0 as ``Add-Padding: true`` asks; it can also hang (until the
test ends) to stand for a slow server. It records every path and header it was sent."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator

import pytest


def sha1_hex(password: str) -> str:
    return hashlib.sha1(password.encode(), usedforsecurity=False).hexdigest().upper()


class RangeServer:
    def __init__(self) -> None:
        self.breached: dict[str, int] = {}  # SHA-1 -> count
        self.padding: set[str] = set()  # SHA-1s answered with count 0, as padding entries are
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hang = False
        self._release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the stdlib's name
                server.requests.append((self.path, dict(self.headers.items())))
                if server.hang:
                    server._release.wait()
                    return
                prefix = self.path.rsplit("/", 1)[-1]
                lines = [f"{h[5:]}:{n}" for h, n in server.breached.items() if h.startswith(prefix)]
                lines += [f"{h[5:]}:0" for h in server.padding if h.startswith(prefix)]
                if self.headers.get("Add-Padding") == "true":
                    lines.append("0" * 35 + ":0")
                body = "\r\n".join(lines).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/range/"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def add(self, password: str, count: int) -> None:
        self.breached[sha1_hex(password)] = count

    def pad(self, password: str) -> None:
        self.padding.add(sha1_hex(password))

    def close(self) -> None:
        """Stop serving (again is harmless): from then on a request's connection is refused."""
        self._release.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(10)


@pytest.fixture
def pwned_range() -> Iterator[RangeServer]:
    server = RangeServer()
    yield server
    server.close()
