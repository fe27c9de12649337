"""The HTTP edge's one ASGI application: a router in front of /metrics, the key set, Connect and
the mounts (SCIM at /scim/v2), with the request body limit every route shares."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from users_grpc.grpc_api.observability import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JWKS_PATH = "/.well-known/jwks.json"
CONNECT_PREFIX = "/users.v1.UserService/"
_TEXT = (b"content-type", b"text/plain; charset=utf-8")


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], *, head: bool = False
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head or status == 304 else body})


class HttpEdge:
    """Routes each request; ``mounts`` maps a path prefix ("/scim/v2") to an app of its own, which
    receives the scope with ``root_path`` set to the prefix and ``path`` without it."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        jwks: Callable[[], bytes],
        ready: asyncio.Event,
        jwks_max_age_seconds: int,
        connect: ASGIApp,
        max_body_bytes: int,
        mounts: Mapping[str, ASGIApp] = {},
    ) -> None:
        self._metrics = metrics
        self._jwks = jwks
        self._ready = ready
        self._jwks_max_age = jwks_max_age_seconds
        self._connect = connect
        self._max_body_bytes = max_body_bytes
        self._mounts = {prefix.rstrip("/"): app for prefix, app in mounts.items()}

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        path: str = scope["path"]
        if path in {"/metrics", JWKS_PATH}:
            await self._operations(scope, send, path)
            return
        target = self._route(scope, path)
        if target is None:
            await respond(send, 404, b"not found\n", [_TEXT])
            return
        app, scope = target
        body = await self._body(scope, receive, send)
        if body is not None:
            await app(scope, _replay(body, receive), send)

    def _route(self, scope: Scope, path: str) -> tuple[ASGIApp, Scope] | None:
        if path.startswith(CONNECT_PREFIX):
            return self._connect, scope
        for prefix, app in self._mounts.items():
            if path == prefix or path.startswith(prefix + "/"):
                inner = dict(scope, root_path=scope.get("root_path", "") + prefix, path=path[len(prefix) :] or "/")
                return app, inner
        return None

    async def _body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or None once answered 413 (past USERS_HTTP_MAX_BODY_BYTES)."""
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_bytes:
            await respond(send, 413, b"request body too large\n", [_TEXT])
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                await respond(send, 413, b"request body too large\n", [_TEXT])
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _operations(self, scope: Scope, send: Send, path: str) -> None:
        method = scope["method"]
        head = method == "HEAD"
        if method not in {"GET", "HEAD"}:
            await respond(send, 405, b"method not allowed\n", [_TEXT, (b"allow", b"GET, HEAD")])
        elif path == "/metrics":
            # Rendered off the loop, on the metrics' own thread (observability.Metrics.exposition).
            exposition = await self._metrics.exposition()
            await respond(send, 200, exposition, [(b"content-type", CONTENT_TYPE_LATEST.encode())], head=head)
        elif not self._ready.is_set():
            # The keys are read once the database is ready; an empty set would make gateways refuse every token.
            await respond(send, 503, b"starting\n", [_TEXT, (b"retry-after", b"1")], head=head)
        else:
            await self._key_set(scope, send, head=head)

    async def _key_set(self, scope: Scope, send: Send, *, head: bool) -> None:
        body = self._jwks()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = [
            (b"content-type", b"application/json"),
            # Replicas start signing with a rotated key within USERS_KEY_RELOAD_SECONDS; a gateway
            # caching the set no longer than that learns the new key about as soon as it is used.
            (b"cache-control", f"public, max-age={self._jwks_max_age}".encode()),
            (b"etag", etag.encode()),
        ]
        if_none_match = dict(scope.get("headers", ())).get(b"if-none-match", b"").decode("latin-1")
        if etag in {tag.strip() for tag in if_none_match.split(",")}:
            await respond(send, 304, b"", headers, head=head)
        else:
            await respond(send, 200, body, headers, head=head)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an app behind the body limit: the body read already, then the connection's own
    messages (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
