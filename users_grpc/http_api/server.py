"""The HTTP edge's server: uvicorn, in the service's own event loop.

uvicorn is the most widely deployed ASGI server; HTTP/1.1 is all that Connect, gRPC-Web and
JSON from browsers and curl need (native gRPC has its own port). It runs inside our loop: the
socket is bound when the app is built (so a busy port fails the start with one sentence), served
from :meth:`HttpServer.start`, and drained by :meth:`HttpServer.stop`, without uvicorn's own
signal handling (``users-grpc serve`` handles the signals and drains both edges).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from users_grpc.domain.errors import ConfigError
from users_grpc.grpc_api.observability import Metrics
from users_grpc.http_api.app import HttpEdge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """What the server bounds (USERS_HTTP_*; docs/settings.md)."""

    # Connections and requests in progress at once; past it uvicorn answers 503 at once.
    max_connections: int
    # An idle keep-alive connection is closed after this long.
    keepalive_seconds: float
    # Requests in progress at stop are given this long to finish.
    shutdown_grace_seconds: float
    # Peers (addresses, networks) whose X-Forwarded-For names the caller: an ingress in front.
    trusted_proxies: tuple[str, ...] = ()


def _listening_socket(address: str, *, reuse_port: bool) -> socket.socket:
    host, _, port = address.rpartition(":")
    try:
        if host in {"[::]", "::"} and socket.has_dualstack_ipv6():
            # One dual-stack socket takes IPv4 too, as gRPC does.
            sock = socket.create_server(
                ("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=reuse_port
            )
        elif host in {"[::]", "::"}:
            # "[::]" asks for every interface
            sock = socket.create_server(("0.0.0.0", int(port)), reuse_port=reuse_port)  # noqa: S104
        else:
            family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
            sock = socket.create_server((host.strip("[]"), int(port)), family=family, reuse_port=reuse_port)
    except OSError as error:
        raise ConfigError(
            f"USERS_HTTP_ADDRESS={address}: cannot listen there ({error.strerror}); "
            "is another server using the port, or is the address not this machine's?"
        ) from None
    sock.setblocking(False)
    return sock


class RequestInTime(H11Protocol):
    """uvicorn's HTTP/1.1, with a bound on the time each request may take to arrive, head and body.

    uvicorn has none: its keep-alive timer stops at a request's first byte, and nothing times a
    body. Requests that never finish arriving held their places (and sockets) for ever, and
    max_connections of them refused every client, /metrics and the key set included. A new
    connection has ``read_seconds`` for its first request; a kept-alive one, from the first byte
    of its next (until then the keep-alive bounds it). A request in whole is the app's to answer.
    """

    read_seconds = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._time_the_request()

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None:  # the first bytes of a request after an answer
            self._time_the_request()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._stop_timing()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timing()
        super().connection_lost(exc)

    def _time_the_request(self) -> None:
        self._read_timer = self.loop.call_later(self.read_seconds, self._too_slow)

    def _stop_timing(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _too_slow(self) -> None:
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # head or body not in yet
            self.transport.close()


class HttpServer:
    def __init__(self, edge: HttpEdge, limits: HttpLimits) -> None:
        self._edge = edge
        config = uvicorn.Config(
            edge,
            lifespan="off",
            http=RequestInTime,
            # Our own JSON log lines; uvicorn's access log would log every scrape.
            log_config=None,
            access_log=False,
            server_header=False,
            # uvicorn's default trusts X-Forwarded-For from loopback peers (a sidecar, any local
            # client) and makes it the client address: every spoofed address its own rate limit and
            # throttle. Only the proxies named are trusted: the caller is the X-Forwarded-For entry
            # the nearest of them appended (the last one not a trusted proxy's), else the peer.
            proxy_headers=bool(limits.trusted_proxies),
            forwarded_allow_ips=list(limits.trusted_proxies),
            # uvicorn counts the connection asking among them: one more lets max_connections be served.
            limit_concurrency=limits.max_connections + 1,
            timeout_keep_alive=max(1, round(limits.keepalive_seconds)),
            timeout_graceful_shutdown=max(1, round(limits.shutdown_grace_seconds)),
        )
        self._server = uvicorn.Server(config)
        self._socket: socket.socket | None = None
        self._ticking: asyncio.Task[None] | None = None

    def bind(self, address: str, *, reuse_port: bool = False) -> int:
        """Listen on ``address`` (host:port) without serving yet; return the port. With ``reuse_port``
        beside the other workers of ``users-grpc serve --workers N`` (users_grpc/workers.py)."""
        self._socket = _listening_socket(address, reuse_port=reuse_port)
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def metrics(self) -> Metrics:
        return self._edge.metrics

    @property
    def connections_open(self) -> int:
        return len(self._server.server_state.connections)

    async def start(self) -> None:
        server = self._server
        if not server.config.loaded:
            server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=None if self._socket is None else [self._socket])
        # uvicorn's clock: the Date header, once a second, and its should_exit flag.
        self._ticking = asyncio.create_task(server.main_loop())

    async def stop(self) -> None:
        """Stop taking connections and let requests in progress finish (within the grace period);
        a second call does nothing more."""
        if self._ticking is None:
            if self._socket is not None:
                self._socket.close()
            self._edge.metrics.close()
            return
        self._server.should_exit = True
        await self._ticking
        self._ticking = None
        await self._server.shutdown(sockets=None if self._socket is None else [self._socket])
        self._edge.metrics.close()
