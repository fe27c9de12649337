"""The server interceptor: access rules, the concurrency cap, deadlines, and the one place where
domain errors become statuses."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from users_grpc.domain.budget import DatabaseBudget, database_budget
from users_grpc.domain.errors import MalformedRequest, Overloaded, StorageUnavailable, TooManyStreams, UsersError
from users_grpc.domain.model import Caller
from users_grpc.grpc_api.access import (
    FLOWS,
    Authorizer,
    bearer_token,
    current_caller,
    metadata_value,
    source_address,
    stream_admission,
)
from users_grpc.grpc_api.observability import current_call
from users_grpc.grpc_api.request_ranges import refuse_out_of_range
from users_grpc.grpc_api.status import to_rpc_status
from users_grpc.services.throttling import SourceRateLimit

log = logging.getLogger(__name__)

_Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
_StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Any, None]]
_Deserializer = Callable[[bytes], Any]

# What a refused caller is told to wait: long enough to let the calls in progress finish.
OVERLOADED_RETRY_AFTER = timedelta(seconds=1)
# A stream holds its place for up to half an hour (the server's connection age), not a second.
STREAMS_FULL_RETRY_AFTER = timedelta(seconds=30)


class _Malformed:
    """Stands in for a request whose bytes did not parse.

    gRPC deserializes before any handler runs, and turns a deserializer's exception into
    UNKNOWN with the exception's text and a logged traceback; so the deserializer hands
    this on instead, and the handler refuses it with a proper status.
    """


_MALFORMED = _Malformed()
# What an edge hands on for a request whose bytes did not parse (the HTTP edge too).
MALFORMED: object = _MALFORMED


class UserServiceInterceptor(grpc.aio.ServerInterceptor):
    """Enforces the access rules and the concurrency cap, maps errors to statuses and bounds
    database work by the call's deadline.

    Applies to the unary methods of the services under ``method_prefix``, and to their
    server-streaming methods (WatchUserChanges), which are never counted by the cap (a stream
    is meant to stay open) but by a cap of their own (each reads the database at every poll), and
    whose caller is admitted again at every poll (:meth:`_readmission`).
    Health and reflection pass through untouched, never counted by either cap (so probes
    answer under any load), except that a unary request that does not parse is refused as
    INVALID_ARGUMENT wherever it goes.
    """

    def __init__(
        self,
        *,
        method_prefix: str,
        db_timeout_seconds: float,
        authorizer: Authorizer,
        max_concurrent_calls: int,
        max_streams: int,
        max_streams_per_caller: int,
        rate_limit: SourceRateLimit,
        ready: asyncio.Event,
    ) -> None:
        self._ready = ready
        self._method_prefix = method_prefix
        self._db_timeout_seconds = db_timeout_seconds
        self._authorizer = authorizer
        self._rate_limit = rate_limit
        self._max_concurrent_calls = max_concurrent_calls
        self._max_streams = max_streams
        self._max_streams_per_caller = max_streams_per_caller
        # One event loop runs every handler, so plain counters are exact.
        self._in_progress = 0
        # Open streams by holder (see _stream_holder); their total is the replica's count.
        self._streams_of: collections.Counter[str] = collections.Counter()

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
                self._guard_stream(method, cast(_StreamBehavior, handler.unary_stream)),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
        # An aio server's handlers are coroutine functions, whatever the sync-typed stubs say.
        behavior = cast(_Behavior, handler.unary_unary)
        guarded = self._guard(method, behavior) if method.startswith(self._method_prefix) else _parsed(method, behavior)
        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    @property
    def streams_open(self) -> int:
        """Streams admitted and not ended yet, which USERS_MAX_STREAMS caps."""
        return self._streams_of.total()

    def _budget(self, context: grpc.aio.ServicerContext[Any, Any]) -> DatabaseBudget:
        """The call's database budget: each operation within the database timeout and the call's deadline."""
        remaining = context.time_remaining()
        return DatabaseBudget(
            per_operation=self._db_timeout_seconds,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )

    async def _identified(
        self, name: str, metadata: Iterable[tuple[str, str | bytes]], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Caller:
        """Who calls ``name``, from where (a machine caller's ``x-forwarded-for`` names the end user's
        address), recorded for the call's log lines before any rule is applied, so that a refusal
        is logged with who was refused."""
        caller = await self._authorizer.caller_of(name, bearer_token(metadata), _machine_names(context))
        forwarded_for = metadata_value(metadata, "x-forwarded-for")
        caller = dataclasses.replace(
            caller, source=source_address(context.peer(), forwarded_for, machine=caller.machine is not None)
        )
        current_caller.set(caller)
        call = current_call.get()
        if call is not None:
            call.caller = caller
        return caller

    def _guard(self, method: str, behavior: _Behavior) -> _Behavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._guarded(method, request, context, stream=False):
                return await behavior(request, context)

        return guarded

    def _guard_stream(self, method: str, behavior: _StreamBehavior) -> _StreamBehavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncGenerator[Any, None]:
            async with (
                self._guarded(method, request, context, stream=True),
                contextlib.aclosing(behavior(request, context)) as responses,
            ):
                async for response in responses:
                    yield response

        return guarded

    @contextlib.asynccontextmanager
    async def _guarded(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any], *, stream: bool
    ) -> AsyncIterator[None]:
        """The one guard of every UserService call, unary or a server stream: the request parsed,
        the service ready, a place free, the caller identified and admitted by the access rule,
        the database budget bound to the deadline, and every error its status."""
        metadata = context.invocation_metadata() or ()
        # Set at once, so that even refusals before the caller is known are logged with its address.
        caller_token = current_caller.set(Caller(source=source_address(context.peer(), None, machine=False)))
        budget_token = database_budget.set(self._budget(context))
        release: Callable[[], None] | None = None
        try:
            if isinstance(request, _Malformed):
                raise MalformedRequest()
            refuse_out_of_range(request)
            if not self._ready.is_set():
                # Uniqueness rests on indexes made at start-up: nothing is served before them.
                raise StorageUnavailable("the service is starting: its database is not ready yet")
            if not stream:
                release = self._take_call_place()
            name = method.rpartition("/")[2]
            caller = await self._identified(name, metadata, context)
            self._authorizer.admit(name, request, caller)
            await self._authorizer.admit_subject(name, request, caller)
            if stream:
                release = self._take_stream_place(caller)
                stream_admission.set(self._readmission(name, request, metadata, context))
            elif name in FLOWS and not caller.is_admin:
                await self._rate_limit.check(caller.source, FLOWS[name])
            yield
        except UsersError as error:
            await _refuse(context, method, error)
        except Exception:
            log.exception("unexpected error", extra={"rpc": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if release is not None:
                release()
            # A stream's are set, never reset: each call runs in its own task, with its own copy of the
            # context, and a stream closed from outside finishes in another context, where a reset would fail.
            if not stream:
                database_budget.reset(budget_token)
                current_caller.reset(caller_token)

    def _take_call_place(self) -> Callable[[], None]:
        """A place among the unary calls in progress, or OVERLOADED; returns what gives it back."""
        if self._in_progress >= self._max_concurrent_calls:
            raise Overloaded(retry_after=OVERLOADED_RETRY_AFTER)
        self._in_progress += 1

        def release() -> None:
            self._in_progress -= 1

        return release

    def _take_stream_place(self, caller: Caller) -> Callable[[], None]:
        """A place among the open streams, within the caller's share; returns what gives it back."""
        # Counted once admitted: strangers' attempts must not take the places of watchers.
        # A caller at its share hears so first: closing its own streams is what helps.
        holder = _stream_holder(caller)
        if self._streams_of[holder] >= self._max_streams_per_caller:
            raise TooManyStreams(retry_after=STREAMS_FULL_RETRY_AFTER)
        if self.streams_open >= self._max_streams:
            raise Overloaded(retry_after=STREAMS_FULL_RETRY_AFTER)
        self._streams_of[holder] += 1

        def release() -> None:
            self._streams_of[holder] -= 1
            if not self._streams_of[holder]:
                del self._streams_of[holder]

        return release

    def _readmission(
        self,
        name: str,
        request: Any,
        metadata: Iterable[tuple[str, str | bytes]],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Callable[[], Awaitable[None]]:
        """The stream's admission, to run again at each poll: the same rule as it opened by,
        with the same credentials, checked against the accounts as they are now."""

        async def readmit() -> None:
            await self._authorizer.readmit(name, request, bearer_token(metadata), _machine_names(context))

        return readmit


def _stream_holder(caller: Caller) -> str:
    """Whose share of the streams a call takes: its machine identity (an mTLS name, or a service
    account's), else its user (an admin)."""
    return f"machine:{caller.machine}" if caller.machine is not None else f"user:{caller.user_id}"


def _parsed(method: str, behavior: _Behavior) -> _Behavior:
    """``behavior``, for a request that parsed; INVALID_ARGUMENT for one that did not."""

    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Malformed):
            current_caller.set(Caller(source=source_address(context.peer(), None, machine=False)))
            await _refuse(context, method, MalformedRequest())
        return await behavior(request, context)

    return checked


def _tolerant(deserializer: _Deserializer | None) -> _Deserializer | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _MALFORMED

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], method: str, error: UsersError) -> None:
    # Refusals are logged by reason only, in one line: messages never carry secrets, but requests may.
    log.info("rpc refused", extra={"rpc": method, "reason": error.reason})
    call = current_call.get()
    if call is not None:
        call.reason = error.reason
    status = rpc_status.to_status(to_rpc_status(error))
    # Added to the trailing metadata already set (the request id), not in its place.
    trailing = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
    await context.abort(status.code, status.details, trailing)


def _machine_names(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The names a verified mTLS client certificate proves, as a machine identity may be listed.

    Only URI SANs (SPIFFE IDs) and DNS SANs count: these are what a CA for services issues
    and checks. The common name and other SANs (an email address, say) are free text to
    many CAs, so a certificate naming ``billing`` there proves nothing about being billing.
    """
    auth = context.auth_context()
    names = [*auth.get("peer_uri", []), *auth.get("peer_dns", [])]
    return [name.decode() if isinstance(name, bytes) else name for name in names]
