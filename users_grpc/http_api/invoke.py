"""One UserService call made from the HTTP edge, through the same pipeline as a gRPC call.

:class:`Invoker` turns an HTTP call into the pipeline's :class:`~users_grpc.pipeline.call.Call` and
runs the very pipeline the gRPC server runs (tracing, the log line and metrics, the guard: access,
rate limits, the concurrency caps, the database budget; audit) around the servicer's method, and
turns a domain error into the same status as over gRPC, by the one table (grpc_api/status.py): no
rule can hold on one edge and not the other, because there is one copy of each. A unary call is
:meth:`Invoker.__call__`, a server stream (WatchUserChanges) :meth:`Invoker.stream`: the stream
cap and the admission again at every poll included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from users_grpc.domain.errors import UsersError
from users_grpc.grpc_api.status import to_rpc_status
from users_grpc.pipeline.call import Call, Unexpected
from users_grpc.pipeline.chain import Pipeline

# The servicer reads nothing of its context: what it needs of the call (the caller, a stream's
# admission) reaches it through the pipeline's context variables, on either edge.
_NO_CONTEXT: Any = None


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
    """Runs ``pipeline`` around ``handlers`` (the servicer's, by full method name): a unary call
    when called, a server stream by :meth:`stream`."""

    def __init__(self, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]], pipeline: Pipeline) -> None:
        self._handlers = handlers
        self._pipeline = pipeline

    async def __call__(self, method: str, request: Message, call: HttpCall) -> Message:
        handler = self._handlers.get(method)
        if handler is None or handler.unary_unary is None:
            raise _unimplemented(f"no unary method {method}")
        behavior = cast(Callable[[Message, Any], Awaitable[Message]], handler.unary_unary)
        try:
            response: Message = await self._pipeline.unary(
                _call_of(method, request, call, stream=False), lambda: behavior(request, _NO_CONTEXT)
            )
        except UsersError as error:
            raise _failed(error) from None
        except Unexpected:
            raise _internal() from None
        return response

    async def stream(self, method: str, request: Message, call: HttpCall) -> AsyncGenerator[Message, None]:
        """The responses of a server stream; :class:`CallFailed` when it is refused or ends in error."""
        handler = self._handlers.get(method)
        if handler is None or handler.unary_stream is None:
            raise _unimplemented(f"no server-streaming method {method}")
        behavior = cast(Callable[[Message, Any], AsyncGenerator[Message, None]], handler.unary_stream)
        responses = self._pipeline.stream(
            _call_of(method, request, call, stream=True), lambda: behavior(request, _NO_CONTEXT)
        )
        try:
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
        except UsersError as error:
            raise _failed(error) from None
        except Unexpected:
            raise _internal() from None


def _call_of(method: str, request: Message, call: HttpCall, *, stream: bool) -> Call:
    # No client certificate reaches the HTTP edge (TLS ends at the ingress), so it proves no machine
    # identity: a machine caller here presents a service account's token.
    deadline = None if call.timeout is None else time.monotonic() + call.timeout
    return Call(
        method=method, request=request, metadata=call.metadata, peer=call.peer, deadline=deadline, stream=stream
    )


def _failed(error: UsersError) -> CallFailed:
    """The status a caller receives over gRPC for ``error``."""
    status = to_rpc_status(error)
    return CallFailed(_CODES[status.code], status.message, status)


def _internal() -> CallFailed:
    code = grpc.StatusCode.INTERNAL
    return CallFailed(code, "internal error", status_pb2.Status(code=code.value[0], message="internal error"))


def _unimplemented(message: str) -> CallFailed:
    code = grpc.StatusCode.UNIMPLEMENTED
    return CallFailed(code, message, status_pb2.Status(code=code.value[0], message=message))


def grpc_peer(host: str, port: int) -> str:
    """grpc's form of a peer address, from an ASGI scope's ``client``."""
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
