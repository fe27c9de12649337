"""One UserService call made from the HTTP edge, through the same pipeline as a gRPC call.

:func:`build_invoke` runs the very interceptors the gRPC server runs (tracing, observability,
access, rate limits, the concurrency caps, the database budget, audit) and then the servicer's
method, with :class:`HttpServicerContext` in place of grpc's context: no rule can hold on one
edge and not the other, because there is one copy of each. A unary call is :meth:`Invoker.__call__`,
a server stream (WatchUserChanges) :meth:`Invoker.stream`: the stream guard's cap and its
admission again at every poll included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class HttpCall:
    """What the HTTP edge knows of a call, in gRPC's terms."""

    # Lower-case header names as gRPC metadata: ("authorization", "Bearer ..."), ("x-forwarded-for", ...).
    metadata: tuple[tuple[str, str], ...]
    # As grpc's context.peer(): "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555".
    peer: str
    # Seconds, from a Connect timeout header (or grpc-timeout), or None.
    timeout: float | None = None


class CallFailed(Exception):
    """A call refused or failed: its status code, message and rich status (ErrorInfo, BadRequest, RetryInfo)."""

    def __init__(self, code: grpc.StatusCode, message: str, status: status_pb2.Status) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# (full method name "/users.v1.UserService/CreateUser", request, call) -> response; unary RPCs.
# A coroutine (an Awaitable that asyncio.run_coroutine_threadsafe also takes).
Invoke = Callable[[str, Message, HttpCall], Coroutine[Any, Any, Message]]

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Metadatum(NamedTuple):
    """One metadata entry as grpc gives it: a pair, also read by name (OpenTelemetry's interceptor does)."""

    key: str
    value: str


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[_Metadatum, ...]


class HttpServicerContext:
    """The part of ``grpc.aio.ServicerContext`` the interceptors and the servicer use, for an HTTP call.

    No client certificate reaches the HTTP edge (TLS ends at the ingress), so it proves no
    machine identity: a machine caller there presents a service account's token.
    """

    def __init__(self, call: HttpCall) -> None:
        self._call = call
        self._metadata = tuple(_Metadatum(key, value) for key, value in call.metadata)
        self._deadline = None if call.timeout is None else time.monotonic() + call.timeout
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._code = grpc.StatusCode.OK
        self._details = ""

    def peer(self) -> str:
        return self._call.peer

    def invocation_metadata(self) -> tuple[_Metadatum, ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return {}

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def invocation_details(self) -> tuple[str, str]:
        return self._code.name, self._details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> None:
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def failure(self) -> CallFailed:
        """The status the call was aborted with, as the caller receives it over gRPC."""
        status = status_pb2.Status(code=self._code.value[0], message=self._details)
        for key, value in self._trailing:
            if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
        return CallFailed(self._code, self._details, status)

    def request_id(self) -> str | None:
        for key, value in self._trailing:
            if key == "x-request-id" and isinstance(value, str):
                return value
        return None


class _HandlerRegistry:
    """Collects the method handlers a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


def method_handlers(add_servicer: Callable[[Any], None]) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The handlers by full method name, as ``add_servicer(server)`` would register them."""
    registry = _HandlerRegistry()
    add_servicer(registry)
    return registry.handlers


class Invoker:
    """Runs ``interceptors`` (outermost first, as the gRPC server is given them) around ``handlers``:
    a unary call when called, a server stream by :meth:`stream`."""

    def __init__(
        self,
        handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
    ) -> None:
        self._handlers = handlers
        self._interceptors = interceptors

    async def __call__(self, method: str, request: Message, call: HttpCall) -> Message:
        handler = await self._resolve(method, call)
        if handler is None or handler.unary_unary is None:
            raise _unimplemented(f"no unary method {method}")
        context = HttpServicerContext(call)
        behavior = cast(Callable[[Message, HttpServicerContext], Awaitable[Message]], handler.unary_unary)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise context.failure() from None

    async def stream(self, method: str, request: Message, call: HttpCall) -> AsyncGenerator[Message, None]:
        """The responses of a server stream; :class:`CallFailed` when it is refused or ends in error."""
        handler = await self._resolve(method, call)
        if handler is None or handler.unary_stream is None:
            raise _unimplemented(f"no server-streaming method {method}")
        context = HttpServicerContext(call)
        behavior = cast(Callable[[Message, HttpServicerContext], AsyncGenerator[Message, None]], handler.unary_stream)
        try:
            # aclosing: a client that leaves ends the change feed's watcher at once (as over gRPC).
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise context.failure() from None

    async def _resolve(self, method: str, call: HttpCall) -> grpc.RpcMethodHandler[Any, Any] | None:
        metadata = tuple(_Metadatum(key, value) for key, value in call.metadata)
        return await self._handler(cast(grpc.HandlerCallDetails, _Details(method, metadata)), 0)

    async def _handler(self, details: grpc.HandlerCallDetails, index: int) -> grpc.RpcMethodHandler[Any, Any] | None:
        if index == len(self._interceptors):
            return self._handlers.get(details.method)

        async def continuation(next_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
            return await self._handler(next_details, index + 1)

        return await self._interceptors[index].intercept_service(continuation, details)


def build_invoke(
    handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
    interceptors: Sequence[grpc.aio.ServerInterceptor],
) -> Invoker:
    """An :data:`Invoke` (and its streams) running ``interceptors`` around ``handlers``."""
    return Invoker(handlers, interceptors)


def _unimplemented(message: str) -> CallFailed:
    code = grpc.StatusCode.UNIMPLEMENTED
    return CallFailed(code, message, status_pb2.Status(code=code.value[0], message=message))


def grpc_peer(host: str, port: int) -> str:
    """grpc's form of a peer address, from an ASGI scope's ``client``."""
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
