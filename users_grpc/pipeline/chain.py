"""The steps of one call in their order, for a unary call and for a server stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from users_grpc.pipeline.audit import AuditTrail
from users_grpc.pipeline.call import Call
from users_grpc.pipeline.guard import CallGuard
from users_grpc.pipeline.observation import Observer
from users_grpc.pipeline.tracing import CallSpans


class Pipeline:
    """The span first (the call's line and its database spans fall within it), then the log line
    and metrics (which see refusals too), the guard, and inside it the audit trail (which sees only
    admitted calls, and the service's outcome). A step raises the call's domain error, or
    :class:`~users_grpc.pipeline.call.Unexpected`; the edge turns it into a status."""

    def __init__(self, *, spans: CallSpans | None, observer: Observer, guard: CallGuard, audit: AuditTrail) -> None:
        self._spans = spans
        self._observer = observer
        self.guard = guard
        self._audit = audit

    async def unary(self, call: Call, handler: Callable[[], Awaitable[Any]]) -> Any:
        with self._span(call), self._observer.observed(call):
            async with self.guard.guarded(call):
                return await self._audit.audited(call, handler)

    async def stream(self, call: Call, handler: Callable[[], AsyncGenerator[Any, None]]) -> AsyncGenerator[Any, None]:
        # aclosing, here and at each edge: a stream left by its client ends the change feed's
        # watcher at once, not when Python's clean-up of abandoned generators gets to it.
        with self._span(call), self._observer.observed(call):
            async with self.guard.guarded(call), contextlib.aclosing(handler()) as responses:
                async for response in responses:
                    yield response

    def _span(self, call: Call) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self._spans is None else self._spans.span(call)
