"""One call as the pipeline sees it, whichever edge it came in by."""

from __future__ import annotations

import asyncio
import enum
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from users_grpc.domain.errors import UsersError
from users_grpc.pipeline.metadata import metadata_value

REQUEST_ID = "x-request-id"
# A caller's request id is logged as given only if it is short and plain; any other is replaced.
_REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class Code(enum.IntEnum):
    """The canonical status codes (gRPC's and google.rpc's numbers), for logs, metrics and audit."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Malformed:
    """Stands in for a request whose bytes did not parse: an edge's decoder hands it on instead of
    failing, and the guard refuses it with a proper status (INVALID_ARGUMENT, MALFORMED_REQUEST)."""


MALFORMED = Malformed()


class Unexpected(Exception):
    """A call failed by something other than a domain error: already logged with its traceback;
    the edge answers INTERNAL with a generic message."""


@dataclass
class Call:
    """What the pipeline knows of a call: the edges build it, the steps read it."""

    # The full method name, "/users.v1.UserService/GetUser".
    method: str
    # The parsed request message, or MALFORMED.
    request: object
    # Lower-case header names as gRPC metadata: ("authorization", "Bearer ..."), ("x-forwarded-for", ...).
    metadata: tuple[tuple[str, str | bytes], ...]
    # The TCP peer in gRPC's form: "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555".
    peer: str
    # time.monotonic() by which the caller stops waiting, or None.
    deadline: float | None = None
    # The names a verified mTLS client certificate proves (URI and DNS SANs); none over HTTP.
    machine_names: tuple[str, ...] = ()
    # A server stream (WatchUserChanges) rather than a unary call.
    stream: bool = False
    # The caller's x-request-id if short and plain, else a new one: logged, and returned to the caller.
    request_id: str = field(init=False)

    def __post_init__(self) -> None:
        given = metadata_value(self.metadata, REQUEST_ID)
        self.request_id = given if given is not None and _REQUEST_ID_FORM.fullmatch(given) else uuid.uuid4().hex

    @property
    def name(self) -> str:
        """The bare RPC name, "GetUser": what the access and audit tables are keyed by."""
        return self.method.rpartition("/")[2]

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


def code_of(error: BaseException, status_of: Callable[[UsersError], Code]) -> Code:
    """The status a call ends with when ``error`` leaves it."""
    if isinstance(error, UsersError):
        return status_of(error)
    if isinstance(error, Unexpected):
        return Code.INTERNAL
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # a stream its client left: GeneratorExit
        return Code.CANCELLED
    return Code.UNKNOWN
