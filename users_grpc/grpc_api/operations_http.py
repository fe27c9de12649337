"""The operations HTTP endpoint (``USERS_HTTP_ADDRESS``): ``/metrics`` for Prometheus and
``/.well-known/jwks.json``, the key set GetPublicKeys answers, on a small asyncio server of its
own, with a cap on its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from users_grpc.domain.errors import ConfigError
from users_grpc.grpc_api.observability import Metrics

http_log = logging.getLogger(__name__)


def _dual_stack_socket(port: int) -> socket.socket:
    if not socket.has_dualstack_ipv6():
        return socket.create_server(("0.0.0.0", port))  # noqa: S104 - "[::]" asks for every interface
    return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)


class OperationsHttp:
    """A small HTTP/1.1 server in the event loop: ``/metrics`` and ``/.well-known/jwks.json``.

    It answers GET and HEAD, one request a connection. Gateways (Envoy's ``jwt_authn``, Kong,
    nginx) fetch the key set from it; Prometheus scrapes the metrics. At most ``max_connections``
    are open at once: past them a connection is answered 503 and closed before a byte is read.
    """

    JWKS_PATH = "/.well-known/jwks.json"
    # Bounds a request's head, and the time a client may take to send it.
    _HEAD_LIMIT = 8192
    _READ_SECONDS = 5.0
    # Bounds the time a client may take to read the answer.
    _WRITE_SECONDS = 10.0
    _BUSY = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(
        self,
        *,
        metrics: Metrics,
        jwks: Callable[[], bytes],
        ready: asyncio.Event,
        jwks_max_age_seconds: int,
        max_connections: int,
    ) -> None:
        self._metrics = metrics
        self._max_connections = max_connections
        self._jwks = jwks
        self._ready = ready
        self._jwks_max_age = jwks_max_age_seconds
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def bind(self, address: str) -> int:
        """Listen on ``address`` (host:port) without serving yet; return the port."""
        host, _, port = address.rpartition(":")
        try:
            if host in {"[::]", "::"}:
                # asyncio would listen on "::" for IPv6 only: one dual-stack socket takes IPv4 too, as gRPC does.
                self._server = await asyncio.start_server(
                    self._handle, sock=_dual_stack_socket(int(port)), limit=self._HEAD_LIMIT, start_serving=False
                )
            else:
                self._server = await asyncio.start_server(
                    self._handle, host.strip("[]"), int(port), limit=self._HEAD_LIMIT, start_serving=False
                )
        except OSError as error:
            raise ConfigError(
                f"USERS_HTTP_ADDRESS={address}: cannot listen there ({error.strerror}); "
                "is another server using the port, or is the address not this machine's?"
            ) from None
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def connections_open(self) -> int:
        """Connections being served, which ``max_connections`` caps."""
        return len(self._connections)

    async def start(self) -> None:
        if self._server is not None:
            await self._server.start_serving()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=1)
        await self._server.wait_closed()
        self._metrics.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            # Refused at once, unread: idle or half-sent requests cannot pile up past the cap.
            writer.write(self._BUSY)
            writer.close()  # after the 503 is flushed
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._READ_SECONDS)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            request = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if len(request) != 3 or not request[2].startswith("HTTP/1."):
                await self._respond(writer, "HEAD", 400, b"bad request\n", {"Content-Type": "text/plain"})
                return
            method, target = request[0], request[1]
            await self._route(writer, method, target.partition("?")[0], headers)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:  # noqa: BLE001 - one failed request must not end in an unretrieved task error
            http_log.exception("http request failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, writer: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str]) -> None:
        text = {"Content-Type": "text/plain; charset=utf-8"}
        if path not in {"/metrics", self.JWKS_PATH}:
            await self._respond(writer, method, 404, b"not found\n", text)
        elif method not in {"GET", "HEAD"}:
            await self._respond(writer, method, 405, b"method not allowed\n", {**text, "Allow": "GET, HEAD"})
        elif path == "/metrics":
            exposition = await self._metrics.exposition()
            await self._respond(writer, method, 200, exposition, {"Content-Type": CONTENT_TYPE_LATEST})
        elif not self._ready.is_set():
            # The keys are read once the database is ready; an empty set would make gateways refuse every token.
            await self._respond(writer, method, 503, b"starting\n", {**text, "Retry-After": "1"})
        else:
            body = self._jwks()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            cache = {
                "Content-Type": "application/json",
                # Replicas start signing with a rotated key within USERS_KEY_RELOAD_SECONDS; a gateway
                # caching the set no longer than that learns the new key about as soon as it is used.
                "Cache-Control": f"public, max-age={self._jwks_max_age}",
                "ETag": etag,
            }
            if etag in {tag.strip() for tag in headers.get("if-none-match", "").split(",")}:
                await self._respond(writer, method, 304, b"", cache)
            else:
                await self._respond(writer, method, 200, body, cache)

    @classmethod
    async def _respond(
        cls, writer: asyncio.StreamWriter, method: str, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        reasons = {200: "OK", 304: "Not Modified", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = [f"HTTP/1.1 {status} {reasons.get(status, 'Service Unavailable')}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(head).encode("latin-1"))
        if method != "HEAD" and status != 304:
            writer.write(body)
        await asyncio.wait_for(writer.drain(), cls._WRITE_SECONDS)
