"""Connect, gRPC-Web and JSON over HTTP: the generated Connect application (protoc-gen-connectrpc,
google.protobuf mode, in generated/users/v1/user_service_connect.py) with every RPC sent to
:data:`~users_grpc.http_api.invoke.Invoke`, so that each runs the same pipeline as over gRPC.

One dispatcher answers every method by name (the request context names the RPC), so an RPC added
to the proto needs no code here. A refusal keeps its ``google.rpc.Status`` details (ErrorInfo,
BadRequest, RetryInfo): Connect's error JSON carries them in ``details``, gRPC-Web in
``grpc-status-details-bin``, as gRPC does. A server stream (WatchUserChanges) goes to
:meth:`~users_grpc.http_api.invoke.Invoker.stream`, through the pipeline's stream guard: the same cap
of streams (counted across both edges), the same admission again at every poll, and the same end
(its status in Connect's end-stream message, or gRPC-Web's trailers) once its caller is revoked.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.method import StreamType
from connectrpc.request import RequestContext
from google.protobuf.message import Message
from protobuf.wkt import Any as AnyDetail

from users.v1.user_service_connect import UserService, UserServiceASGIApplication
from users_grpc.http_api.app import ASGIApp
from users_grpc.http_api.invoke import CallFailed, HttpCall, Invoker, grpc_peer
from users_grpc.pipeline.call import MALFORMED

# Connect spells one code otherwise; the rest are gRPC's names in lower case.
_CONNECT_CODES = {grpc.StatusCode.CANCELLED: Code.CANCELED}


class _TolerantCodec:
    """A codec whose undecodable request is handed on as a malformed request, which the pipeline
    refuses as gRPC does (INVALID_ARGUMENT, reason MALFORMED_REQUEST, logged and counted)."""

    def __init__(self, codec: Any) -> None:
        self._codec = codec

    def name(self) -> str:
        name: str = self._codec.name()
        return name

    def encode(self, message: Message) -> bytes:
        encoded: bytes = self._codec.encode(message)
        return encoded

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Any:
        try:
            return self._codec.decode(data, message_class)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and json_format's ParseError alike
            return MALFORMED


def _http_call(ctx: RequestContext[Any, Any]) -> HttpCall:
    metadata = tuple(
        (key.lower(), value) for key, value in ctx.request_headers.allitems() if not key.lower().endswith("-bin")
    )
    host, _, port = (ctx.client_address or "").rpartition(":")
    timeout_ms = ctx.timeout_ms
    return HttpCall(
        metadata=metadata,
        peer=grpc_peer(host.strip("[]"), int(port)) if port.isdigit() else "unknown",
        timeout=None if timeout_ms is None else max(0.0, timeout_ms / 1000),
    )


def connect_error(failed: CallFailed) -> ConnectError:
    """The Connect error of a refused call, with the same details as the gRPC status."""
    code = _CONNECT_CODES.get(failed.code) or Code(failed.code.name.lower())
    details = [ErrorDetail(AnyDetail(type_url=any_.type_url, value=any_.value)) for any_ in failed.status.details]
    return ConnectError(code, failed.message, details)


class _Dispatcher:
    """Stands for the generated ``UserService`` protocol: every method is one call to ``invoke``."""

    def __init__(self, invoke: Invoker) -> None:
        self._invoke = invoke

    def __getattr__(self, _name: str) -> Callable[[Any, RequestContext[Any, Any]], Any]:
        return self._call

    def _call(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        if ctx.method.stream_type is StreamType.SERVER_STREAM:
            return self._server_stream(request, ctx)
        return self._unary(request, ctx)

    async def _unary(self, request: Any, ctx: RequestContext[Any, Any]) -> Message:
        try:
            return await self._invoke(_method(ctx), request, _http_call(ctx))
        except CallFailed as failed:
            raise connect_error(failed) from None

    async def _server_stream(self, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Message]:
        try:
            async with contextlib.aclosing(self._invoke.stream(_method(ctx), request, _http_call(ctx))) as responses:
                async for response in responses:
                    yield response
        except CallFailed as failed:
            raise connect_error(failed) from None


def _method(ctx: RequestContext[Any, Any]) -> str:
    return f"/{ctx.method.service_name}/{ctx.method.name}"


def connect_app(invoke: Invoker, *, max_body_bytes: int) -> ASGIApp:
    """The Connect application for UserService, every call through ``invoke``."""
    codecs = [_TolerantCodec(google_protobuf_binary_codec()), _TolerantCodec(google_protobuf_json_codec())]
    app = UserServiceASGIApplication(
        cast(UserService, _Dispatcher(invoke)), read_max_bytes=max_body_bytes, codecs=cast(Any, codecs)
    )
    return cast(ASGIApp, app)
