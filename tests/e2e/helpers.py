"""Small helpers for calling the server through a real channel."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status
from pymongo import MongoClient

from users.v1 import user_pb2, user_service_pb2

PASSWORD = "correct horse battery"


def create_request(**changes: Any) -> user_service_pb2.CreateUserRequest:
    fields: dict[str, Any] = {
        "username": "jane",
        "first_name": "Jane",
        "last_name": "Doe",
        "email": "jane@example.com",
        "password": PASSWORD,
        "password_confirmation": PASSWORD,
        "gender": user_pb2.GENDER_FEMALE,
    }
    fields.update(changes)
    return user_service_pb2.CreateUserRequest(**fields)


def rpc_error(call: Any, request: Any, **kwargs: Any) -> grpc.RpcError:
    """Make a call that must fail, and return its error."""
    try:
        call(request, **kwargs)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"{request!r} succeeded")


def violated_fields(error: grpc.RpcError) -> set[str]:
    """The fields named by the error's google.rpc.BadRequest detail."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    fields: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.update(v.field for v in bad_request.field_violations)
    return fields


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def health_stub(channel: grpc.Channel) -> Any:
    # Typed as Any: the grpcio-health-checking stubs declare no methods on HealthStub.
    return health_pb2_grpc.HealthStub(channel)


def stored_users(mongodb_uri: str, database: str, **query: Any) -> list[dict[str, Any]]:
    """The user documents as stored, read with a client of the test's own."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        return list(client[database].users.find(query))


def retry_delay_seconds(error: grpc.RpcError) -> float:
    """The delay of the error's google.rpc.RetryInfo detail."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay: float = info.retry_delay.ToTimedelta().total_seconds()
            return delay
    raise AssertionError("no RetryInfo detail")
