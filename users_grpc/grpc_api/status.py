"""The one table from domain error to gRPC status, ErrorInfo reason and details.

The domain error tree (domain/errors.py) knows nothing of gRPC; this module is where each
error becomes the ``google.rpc.Status`` a caller receives.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from users.v1 import error_reason_pb2, password_policy_pb2
from users_grpc.domain.errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    InvalidArgument,
    InvalidCredentials,
    InvalidPasskey,
    InvalidSecondFactor,
    NotFound,
    Overloaded,
    PasswordChangeRequired,
    PasswordCheckUnavailable,
    PermissionDenied,
    StorageUnavailable,
    TooManyAttempts,
    TooManyRequests,
    TooManyStreams,
    Unauthenticated,
    UsersError,
    check_error_classes,
)
from users_grpc.pipeline.call import Code

ERROR_DOMAIN = "users.v1"
# buf's lint wants enum values prefixed; the reason on the wire is the name without it.
ERROR_REASON_PREFIX = "ERROR_REASON_"


def _listed_in_the_contract(cls: type[UsersError]) -> None:
    # The contract lists every reason a caller can see; a new one goes into the proto first.
    if ERROR_REASON_PREFIX + cls.reason not in error_reason_pb2.ErrorReason.DESCRIPTOR.values_by_name:
        raise TypeError(f"{cls.__name__}.reason {cls.reason!r} is not a users.v1.ErrorReason")


check_error_classes(_listed_in_the_contract)


STATUS_CODES: dict[type[UsersError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    InvalidCredentials: grpc.StatusCode.UNAUTHENTICATED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    InvalidSecondFactor: grpc.StatusCode.UNAUTHENTICATED,
    InvalidPasskey: grpc.StatusCode.UNAUTHENTICATED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    EtagMismatch: grpc.StatusCode.ABORTED,
    TooManyAttempts: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyRequests: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    PasswordCheckUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: UsersError) -> grpc.StatusCode:
    return next(STATUS_CODES[cls] for cls in type(error).__mro__ if cls in STATUS_CODES)


def pipeline_code(error: UsersError) -> Code:
    """``error``'s status code as the pipeline records it (in the call's log line, metrics, audit event and span)."""
    return Code(status_code(error).value[0])


def to_rpc_status(error: UsersError) -> status_pb2.Status:
    """The ``google.rpc.Status`` a caller receives for ``error``: code, message and details."""
    code = status_code(error)
    details: list[Message] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    ]
    if isinstance(error, InvalidArgument):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(error.retry_after)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(error, PasswordChangeRequired):
        details.append(_password_change_detail(error))
    status = status_pb2.Status(code=_RPC_CODES[code], message=str(error))
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


def _password_change_detail(error: PasswordChangeRequired) -> password_policy_pb2.PasswordChangeRequired:
    """The token travels in a detail message of its own, never in ErrorInfo's metadata: refusals are
    logged and audited by reason only, so the trailer that carries it is the one place it is."""
    expire_time = timestamp_pb2.Timestamp()
    expire_time.FromDatetime(error.expires_at)
    return password_policy_pb2.PasswordChangeRequired(
        user_id=error.user_id, password_change_token=error.token, expire_time=expire_time
    )


# google.rpc.Code numbers are the gRPC status numbers, under other names.
_RPC_CODES = {code: code_pb2.Code.Value(code.name) for code in STATUS_CODES.values()}
