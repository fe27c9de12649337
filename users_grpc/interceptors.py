"""The server interceptor: access rules, deadlines, and the one place where domain errors become statuses."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
import pymongo
from grpc_status import rpc_status

from users_grpc.access import Authorizer, bearer_token, current_caller, metadata_value, source_address
from users_grpc.errors import UsersError, to_rpc_status

log = logging.getLogger(__name__)

_Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class UserServiceInterceptor(grpc.aio.ServerInterceptor):
    """Enforces the access rules, maps errors to statuses and bounds database work by the call's deadline.

    Applies to the unary methods of the services under ``method_prefix``;
    health and reflection pass through untouched.
    """

    def __init__(self, *, method_prefix: str, db_timeout_seconds: float, authorizer: Authorizer) -> None:
        self._method_prefix = method_prefix
        self._db_timeout_seconds = db_timeout_seconds
        self._authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(self._method_prefix):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            # An aio server's handlers are coroutine functions, whatever the sync-typed stubs say.
            self._guard(method, cast(_Behavior, handler.unary_unary)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guard(self, method: str, behavior: _Behavior) -> _Behavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            budget = self._db_timeout_seconds
            remaining = context.time_remaining()
            if remaining is not None:
                budget = max(min(budget, remaining), 0.001)
            try:
                # Every PyMongo call in this RPC shares this deadline (PyMongo CSOT).
                with pymongo.timeout(budget):
                    metadata = context.invocation_metadata() or ()
                    caller = await self._authorizer.authorize(
                        method.rpartition("/")[2], request, bearer_token(metadata), _peer_identities(context)
                    )
                    caller = dataclasses.replace(
                        caller,
                        source=source_address(
                            context.peer(),
                            metadata_value(metadata, "x-forwarded-for"),
                            machine=caller.machine is not None,
                        ),
                    )
                    token = current_caller.set(caller)
                    try:
                        return await behavior(request, context)
                    finally:
                        current_caller.reset(token)
            except UsersError as error:
                # Refusals are logged by reason only: messages never carry secrets, but requests may.
                log.info("rpc refused", extra={"rpc": method, "reason": error.reason})
                status = rpc_status.to_status(to_rpc_status(error))
                await context.abort(status.code, status.details, status.trailing_metadata)
            except Exception:
                log.exception("unexpected error", extra={"rpc": method})
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return guarded


def _peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The names in a verified mTLS client certificate (common name and subject alternative names)."""
    auth = context.auth_context()
    names = [*auth.get("x509_common_name", []), *auth.get("x509_subject_alternative_name", [])]
    return [name.decode() if isinstance(name, bytes) else name for name in names]
