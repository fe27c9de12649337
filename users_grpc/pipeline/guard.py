"""The guard of every UserService call, unary or a server stream: the request parsed and in range,
the service ready, a place free, the caller identified and admitted by its access rule, the
per-source rate limit, the database budget bound to the deadline; a stream's admission again at
every poll. It raises domain errors; the edge maps them to a status."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Protocol

from users_grpc.domain.budget import DatabaseBudget, database_budget
from users_grpc.domain.errors import MalformedRequest, Overloaded, StorageUnavailable, TooManyStreams, UsersError
from users_grpc.domain.model import Caller
from users_grpc.pipeline.call import Call, Malformed, Unexpected
from users_grpc.pipeline.current import current_call, current_caller, stream_admission
from users_grpc.pipeline.metadata import bearer_token, metadata_value, source_address
from users_grpc.services.throttling import Flow, SourceRateLimit

log = logging.getLogger("users_grpc.grpc_api.interceptors")  # the name operators' log filters know

# What a refused caller is told to wait: long enough to let the calls in progress finish.
OVERLOADED_RETRY_AFTER = timedelta(seconds=1)
# A stream holds its place for up to half an hour (the server's connection age), not a second.
STREAMS_FULL_RETRY_AFTER = timedelta(seconds=30)


class Admission(Protocol):
    """Who calls and whether their rule admits them (grpc_api/access.py's Authorizer, wired in bootstrap.py)."""

    async def caller_of(self, method: str, bearer_token: str | None, peer_identities: Iterable[str]) -> Caller: ...

    def admit(self, method: str, request: object, caller: Caller) -> None: ...

    async def admit_subject(self, method: str, request: object, caller: Caller) -> None: ...

    async def readmit(
        self, method: str, request: object, bearer_token: str | None, peer_identities: Iterable[str]
    ) -> None: ...


class CallGuard:
    """Enforces the access rules and the concurrency caps and bounds database work by the deadline.

    Unary calls are counted by one cap; streams (WatchUserChanges) never by it (a stream is meant
    to stay open) but by a cap of their own (each reads the database at every poll), with a share
    per caller, and their caller is admitted again at every poll (:meth:`_readmission`).
    """

    def __init__(
        self,
        *,
        db_timeout_seconds: float,
        admission: Admission,
        flows: Mapping[str, Flow],
        check_request: Callable[[object], None],
        max_concurrent_calls: int,
        max_streams: int,
        max_streams_per_caller: int,
        rate_limit: SourceRateLimit,
        ready: asyncio.Event,
    ) -> None:
        self._ready = ready
        self._db_timeout_seconds = db_timeout_seconds
        self._admission = admission
        self._flows = flows
        self._check_request = check_request
        self._rate_limit = rate_limit
        self._max_concurrent_calls = max_concurrent_calls
        self._max_streams = max_streams
        self._max_streams_per_caller = max_streams_per_caller
        # One event loop runs every handler, so plain counters are exact.
        self._in_progress = 0
        # Open streams by holder (see _stream_holder); their total is the replica's count.
        self._streams_of: collections.Counter[str] = collections.Counter()

    @property
    def streams_open(self) -> int:
        """Streams admitted and not ended yet, which USERS_MAX_STREAMS caps."""
        return self._streams_of.total()

    @contextlib.asynccontextmanager
    async def guarded(self, call: Call) -> AsyncIterator[None]:
        """Admits ``call`` (or raises its domain error) for the body, and logs every refusal and
        unexpected error of the call, the servicer's included: an unexpected one as :class:`Unexpected`."""
        # Set at once, so that even refusals before the caller is known are logged with its address.
        caller_token = current_caller.set(Caller(source=source_address(call.peer, None, machine=False)))
        budget_token = database_budget.set(self._budget(call))
        release: Callable[[], None] | None = None
        try:
            if isinstance(call.request, Malformed):
                raise MalformedRequest()
            self._check_request(call.request)
            if not self._ready.is_set():
                # Uniqueness rests on indexes made at start-up: nothing is served before them.
                raise StorageUnavailable("the service is starting: its database is not ready yet")
            if not call.stream:
                release = self._take_call_place()
            caller = await self._identified(call)
            self._admission.admit(call.name, call.request, caller)
            await self._admission.admit_subject(call.name, call.request, caller)
            if call.stream:
                release = self._take_stream_place(caller)
                stream_admission.set(self._readmission(call))
            elif call.name in self._flows and not caller.is_admin:
                await self._rate_limit.check(caller.source, self._flows[call.name])
            yield
        except UsersError as error:
            refused(call, error)
            raise
        except Exception as error:
            log.exception("unexpected error", extra={"rpc": call.method})
            raise Unexpected() from error
        finally:
            if release is not None:
                release()
            # A stream's are set, never reset: each call runs in its own task, with its own copy of the
            # context, and a stream closed from outside finishes in another context, where a reset would fail.
            if not call.stream:
                database_budget.reset(budget_token)
                current_caller.reset(caller_token)

    def _budget(self, call: Call) -> DatabaseBudget:
        """The call's database budget: each operation within the database timeout and the call's deadline."""
        return DatabaseBudget(per_operation=self._db_timeout_seconds, deadline=call.deadline)

    async def _identified(self, call: Call) -> Caller:
        """Who calls, from where (a machine caller's ``x-forwarded-for`` names the end user's
        address), recorded for the call's log lines before any rule is applied, so that a refusal
        is logged with who was refused."""
        caller = await self._admission.caller_of(call.name, bearer_token(call.metadata), call.machine_names)
        forwarded_for = metadata_value(call.metadata, "x-forwarded-for")
        caller = dataclasses.replace(
            caller, source=source_address(call.peer, forwarded_for, machine=caller.machine is not None)
        )
        current_caller.set(caller)
        record = current_call.get()
        if record is not None:
            record.caller = caller
        return caller

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

    def _readmission(self, call: Call) -> Callable[[], Awaitable[None]]:
        """The stream's admission, to run again at each poll: the same rule as it opened by,
        with the same credentials, checked against the accounts as they are now."""

        async def readmit() -> None:
            await self._admission.readmit(call.name, call.request, bearer_token(call.metadata), call.machine_names)

        return readmit


def refused(call: Call, error: UsersError) -> None:
    """A refusal, logged by reason only, in one line: messages never carry secrets, but requests may."""
    log.info("rpc refused", extra={"rpc": call.method, "reason": error.reason})
    record = current_call.get()
    if record is not None:
        record.reason = error.reason


def _stream_holder(caller: Caller) -> str:
    """Whose share of the streams a call takes: its machine identity (an mTLS name, or a service
    account's), else its user (an admin)."""
    return f"machine:{caller.machine}" if caller.machine is not None else f"user:{caller.user_id}"
