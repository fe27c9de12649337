"""The server interceptor: access rules, deadlines, and the one place where domain errors become statuses."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from grpc_status import rpc_status

from users_grpc.access import (
    RATE_LIMITED,
    Authorizer,
    bearer_token,
    current_caller,
    metadata_value,
    source_address,
)
from users_grpc.errors import UsersError, to_rpc_status
from users_grpc.repository import DatabaseBudget, database_budget
from users_grpc.throttling import SourceRateLimit

log = logging.getLogger(__name__)

_Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class UserServiceInterceptor(grpc.aio.ServerInterceptor):
    """Enforces the access rules, maps errors to statuses and bounds database work by the call's deadline.

    Applies to the unary methods of the services under ``method_prefix``;
    health and reflection pass through untouched.
    """

    def __init__(
        self, *, method_prefix: str, db_timeout_seconds: float, authorizer: Authorizer, rate_limit: SourceRateLimit
    ) -> None:
        self._method_prefix = method_prefix
        self._db_timeout_seconds = db_timeout_seconds
        self._authorizer = authorizer
        self._rate_limit = rate_limit

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
            remaining = context.time_remaining()
            budget = database_budget.set(
                DatabaseBudget(
                    per_operation=self._db_timeout_seconds,
                    deadline=None if remaining is None else time.monotonic() + remaining,
                )
            )
            try:
                metadata = context.invocation_metadata() or ()
                name = method.rpartition("/")[2]
                caller = await self._authorizer.authorize(
                    name, request, bearer_token(metadata), _peer_identities(context)
                )
                caller = dataclasses.replace(
                    caller,
                    source=source_address(
                        context.peer(),
                        metadata_value(metadata, "x-forwarded-for"),
                        machine=caller.machine is not None,
                    ),
                )
                if name in RATE_LIMITED and caller.user_id is None:
                    await self._rate_limit.check(caller.source)
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
            finally:
                database_budget.reset(budget)

        return guarded


def _peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The names in a verified mTLS client certificate (common name and subject alternative names)."""
    auth = context.auth_context()
    names = [*auth.get("x509_common_name", []), *auth.get("x509_subject_alternative_name", [])]
    return [name.decode() if isinstance(name, bytes) else name for name in names]
