"""The gRPC edge of the call pipeline (users_grpc/pipeline): one server interceptor that turns a
gRPC call into a :class:`~users_grpc.pipeline.call.Call`, runs the pipeline, and turns its domain
error into the status, by the one table (status.py)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from users_grpc.domain.errors import MalformedRequest, UsersError
from users_grpc.domain.model import Caller
from users_grpc.grpc_api.status import to_rpc_status
from users_grpc.pipeline.call import MALFORMED, REQUEST_ID, Call, Malformed, Unexpected
from users_grpc.pipeline.chain import Pipeline
from users_grpc.pipeline.current import current_caller
from users_grpc.pipeline.metadata import source_address

log = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]
_Behavior = Callable[[Any, _Context], Awaitable[Any]]
_StreamBehavior = Callable[[Any, _Context], AsyncGenerator[Any, None]]
_Deserializer = Callable[[bytes], Any]


class PipelineInterceptor(grpc.aio.ServerInterceptor):
    """Runs the pipeline for the unary and server-streaming methods of the services under
    ``method_prefix``. Health and reflection pass through untouched, never counted by either cap
    (so probes answer under any load), except that a unary request that does not parse is refused
    as INVALID_ARGUMENT wherever it goes.

    gRPC deserializes before any handler runs, and turns a deserializer's exception into UNKNOWN
    with the exception's text and a logged traceback; so the deserializer hands on
    :data:`~users_grpc.pipeline.call.MALFORMED` instead, which the guard refuses with a proper status.
    """

    def __init__(self, *, method_prefix: str, pipeline: Pipeline) -> None:
        self._method_prefix = method_prefix
        self._pipeline = pipeline

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_stream is not None and method.startswith(self._method_prefix):
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, cast(_StreamBehavior, handler.unary_stream)),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
        # An aio server's handlers are coroutine functions, whatever the sync-typed stubs say.
        behavior = cast(_Behavior, handler.unary_unary)
        guarded = self._unary(method, behavior) if method.startswith(self._method_prefix) else _parsed(method, behavior)
        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _unary(self, method: str, behavior: _Behavior) -> _Behavior:
        async def run(request: Any, context: _Context) -> Any:
            call = _call_of(method, request, context, stream=False)
            try:
                return await self._pipeline.unary(call, lambda: behavior(request, context))
            except UsersError as error:
                await _abort(context, error)
            except Unexpected:
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return run

    def _stream(self, method: str, behavior: _StreamBehavior) -> _StreamBehavior:
        async def run(request: Any, context: _Context) -> AsyncGenerator[Any, None]:
            call = _call_of(method, request, context, stream=True)
            try:
                async with contextlib.aclosing(
                    self._pipeline.stream(call, lambda: behavior(request, context))
                ) as responses:
                    async for response in responses:
                        yield response
            except UsersError as error:
                await _abort(context, error)
            except Unexpected:
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return run


def _call_of(method: str, request: Any, context: _Context, *, stream: bool) -> Call:
    """The pipeline's call, read from the context at once: a stream its client left may be closed
    after grpc has freed the call, and then asking the context (its peer, say) crashes the process."""
    remaining = context.time_remaining()
    call = Call(
        method=method,
        request=request,
        metadata=tuple((key, value) for key, value in context.invocation_metadata() or ()),
        peer=context.peer(),
        deadline=None if remaining is None else time.monotonic() + remaining,
        machine_names=_machine_names(context),
        stream=stream,
    )
    # Set first: an abort keeps what the call already set (_abort adds its details).
    context.set_trailing_metadata(((REQUEST_ID, call.request_id),))
    return call


def _parsed(method: str, behavior: _Behavior) -> _Behavior:
    """``behavior``, for a request that parsed; INVALID_ARGUMENT for one that did not."""

    async def checked(request: Any, context: _Context) -> Any:
        if isinstance(request, Malformed):
            current_caller.set(Caller(source=source_address(context.peer(), None, machine=False)))
            log.info("rpc refused", extra={"rpc": method, "reason": MalformedRequest.reason})
            await _abort(context, MalformedRequest())
        return await behavior(request, context)

    return checked


def _tolerant(deserializer: _Deserializer | None) -> _Deserializer | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return MALFORMED

    return deserialize


async def _abort(context: _Context, error: UsersError) -> None:
    status = rpc_status.to_status(to_rpc_status(error))
    # Added to the trailing metadata already set (the request id), not in its place.
    trailing = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
    await context.abort(status.code, status.details, trailing)


def _machine_names(context: _Context) -> tuple[str, ...]:
    """The names a verified mTLS client certificate proves, as a machine identity may be listed.

    Only URI SANs (SPIFFE IDs) and DNS SANs count: these are what a CA for services issues
    and checks. The common name and other SANs (an email address, say) are free text to
    many CAs, so a certificate naming ``billing`` there proves nothing about being billing.
    """
    auth = context.auth_context()
    names = [*auth.get("peer_uri", []), *auth.get("peer_dns", [])]
    return tuple(name.decode() if isinstance(name, bytes) else name for name in names)
