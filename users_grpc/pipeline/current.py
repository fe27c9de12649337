"""What the pipeline learns of the call in progress, for the steps within and the servicer: who
calls (:data:`current_caller`), how to admit a stream again (:data:`stream_admission`), and what
the call's log line and metrics will say (:data:`current_call`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from users_grpc.domain.errors import PermissionDenied
from users_grpc.domain.model import ANONYMOUS, Caller

current_caller: ContextVar[Caller] = ContextVar("current_caller", default=ANONYMOUS)


async def _never_admitted() -> None:
    raise PermissionDenied("no access rule admitted this stream")  # fail closed


# A stream's admission, run again: set by the guard once it admitted the stream's caller, it
# raises as :meth:`Authorizer.admit` would for a call made now. The change feed runs it at every
# poll, so that a stream ends as soon as its caller is revoked, never at the connection's age.
stream_admission: ContextVar[Callable[[], Awaitable[None]]] = ContextVar("stream_admission", default=_never_admitted)


class CallRecord:
    """What the guard learns about a call, for the line and metrics written at its end."""

    __slots__ = ("caller", "reason")

    def __init__(self) -> None:
        self.caller: Caller | None = None
        self.reason: str | None = None


current_call: ContextVar[CallRecord | None] = ContextVar("current_call", default=None)
"""Set by the observation step for each UserService call; None outside calls."""
