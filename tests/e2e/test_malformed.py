"""Bytes that are no protobuf message of the request's type: INVALID_ARGUMENT "malformed request"
for every RPC, logged as one short line, never UNKNOWN with internals or a traceback."""

from __future__ import annotations

import base64
import logging
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support.calls import error_info, rpc_error, signed_up, violated_fields
from tests.support.mail import MailSink
from tests.support.servers import RunningServer
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.grpc_api.request_ranges import NUMBER_RANGES
from users_grpc.services.changes import cursor_of

SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]
# Field 1, length 127, but only one byte follows: truncated, whatever the message type.
TRUNCATED = b"\x0a\x7f\x00"
# Field 1, length 2, bytes that are not UTF-8: malformed where field 1 is a string.
NOT_UTF8 = b"\x0a\x02\xff\xfe"


def malformed_payloads(input_type: object) -> list[bytes]:
    field = input_type.fields_by_number.get(1)  # type: ignore[attr-defined]
    return [TRUNCATED, NOT_UTF8] if field is not None and field.type == FieldDescriptor.TYPE_STRING else [TRUNCATED]


def raw_call(server: RunningServer, method: str, payload: bytes) -> grpc.RpcError:
    # No serializers: the bytes go on the wire as they are.
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = server.channel.unary_unary(
        method, request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as raised:
        call(payload, timeout=10)
    return raised.value


def test_every_rpc_refuses_malformed_bytes_without_a_traceback(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    calls = 0
    for method in SERVICE.methods:
        for payload in malformed_payloads(method.input_type):
            error = raw_call(server, f"/{SERVICE.full_name}/{method.name}", payload)
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed request"), (
                method.name,
                payload,
            )
            assert error_info(error).reason == "MALFORMED_REQUEST"
            calls += 1
    # Health checks too: a probe sending garbage is told so.
    error = raw_call(server, "/grpc.health.v1.Health/Check", TRUNCATED)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
    assert all(record.exc_info is None for record in caplog.records)
    assert "Traceback" not in caplog.text
    assert "DecodeError" not in caplog.text
    refusals = [
        r
        for r in caplog.records
        if r.getMessage() == "rpc refused" and getattr(r, "reason", None) == "MALFORMED_REQUEST"
    ]
    assert len(refusals) == calls + 1
    assert all(len(record.getMessage()) < 80 for record in refusals)
    # A well-formed request still works, of course.
    assert server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json


# Numbers out of range: INVALID_ARGUMENT naming the field, at the edge, never INTERNAL with a
# traceback (issue 20). Values as the audit sent them, then the extremes of every numeric field.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TIMESTAMP_MIN, TIMESTAMP_MAX = -62_135_596_800, 253_402_300_799  # 0001-01-01, 9999-12-31T23:59:59
# (seconds, nanos) the audit sent.
AUDITED_TIMESTAMPS = [
    (1_099_511_627_776, 0),
    (-1_099_511_627_776, 0),
    (253_402_300_800, 0),
    (0, -1),
    (0, 2_000_000_000),
]
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# What each integer type can carry, where it is not an int32's.
WIDEST = {
    FieldDescriptor.TYPE_INT64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_SINT64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_SFIXED64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
}


def names_field(error: grpc.RpcError, path: str) -> bool:
    return any(field == path or field.startswith(path + ".") for field in violated_fields(error))


def assert_refused_naming(call: Any, request: Any, path: str) -> None:
    error = rpc_error(call, request, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, request, error.code(), error.details())
    assert names_field(error, path), (path, request, violated_fields(error))


def test_the_audited_out_of_range_numbers_are_invalid_arguments_naming_the_field(
    server: RunningServer, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    user = signed_up(server, mail)
    as_user = server.stub_for(user.access_token)
    # Any signed-in user, on themself, unthrottled: a revision past BSON's 8-byte integers.
    for raw in ["9223372036854775808:0", "-1:0", "0:99999999999999999999"]:
        etag = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        assert_refused_naming(
            as_user.UpdateUser,
            pb.UpdateUserRequest(
                user_id=user.user.id,
                user=user_pb2.User(first_name="June"),
                update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
                etag=etag,
            ),
            "etag",
        )
    for seconds, nanos in AUDITED_TIMESTAMPS:
        moment = Timestamp(seconds=seconds, nanos=nanos)
        for field in ("start_create_time", "end_create_time"):
            list_users = pb.ListUsersRequest()
            getattr(list_users, field).CopyFrom(moment)
            assert_refused_naming(server.stub.ListUsers, list_users, field)
        for field in ("start_time", "end_time"):
            list_events = pb.ListAuditEventsRequest()
            getattr(list_events, field).CopyFrom(moment)
            assert_refused_naming(server.stub.ListAuditEvents, list_events, field)
    # A change-feed cursor naming a change past BSON's 8-byte integers.
    with pytest.raises(grpc.RpcError) as raised:
        next(iter(server.stub.WatchUserChanges(pb.WatchUserChangesRequest(after=cursor_of(2**64 - 1)), timeout=10)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names_field(raised.value, "after")
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info is not None]
    # The extremes that are in range are served.
    for seconds, nanos in [(TIMESTAMP_MIN, 0), (TIMESTAMP_MAX, 999_999_999)]:
        moment = Timestamp(seconds=seconds, nanos=nanos)
        server.stub.ListUsers(pb.ListUsersRequest(start_create_time=moment, end_create_time=moment))
        server.stub.ListAuditEvents(pb.ListAuditEventsRequest(start_time=moment))
        server.stub.ListAuditEvents(pb.ListAuditEventsRequest(end_time=moment))


def numeric_paths(descriptor: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path (fields from the request down) of every number in a request: integers, floats,
    enums, Timestamps and Durations, however deep."""
    found: list[tuple[Any, ...]] = []
    for field in descriptor.fields:
        path = (*prefix, field)
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            if field.type not in {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_BOOL}:
                found.append(path)
        elif field.message_type.full_name in {"google.protobuf.Timestamp", "google.protobuf.Duration"}:
            found.append(path)
        elif field.message_type not in [f.message_type for f in prefix]:  # recursive messages: once
            found += numeric_paths(field.message_type, path)
    return found


def extremes(field: Any) -> list[tuple[Any, bool]]:
    """Values to send in ``field``, each with whether it is in the field's documented range."""
    kind = field.message_type.full_name if field.type == FieldDescriptor.TYPE_MESSAGE else None
    if kind == "google.protobuf.Timestamp":
        seconds = [(TIMESTAMP_MIN, True), (TIMESTAMP_MAX, True), (0, True), (TIMESTAMP_MIN - 1, False)]
        seconds += [(TIMESTAMP_MAX + 1, False), (INT64_MIN, False), (INT64_MAX, False)]
        values = [({"seconds": s, "nanos": 0}, ok) for s, ok in seconds]
        values += [({"seconds": TIMESTAMP_MAX, "nanos": 999_999_999}, True)]
        values += [({"nanos": n}, False) for n in (-1, 1_000_000_000, INT32_MIN, INT32_MAX)]
        return [*values, *(({"seconds": s, "nanos": n}, False) for s, n in AUDITED_TIMESTAMPS)]
    if kind == "google.protobuf.Duration":
        return [({"seconds": 315_576_000_000}, True), ({"seconds": -315_576_000_001}, False),
                ({"seconds": INT64_MAX}, False), ({"seconds": 1, "nanos": -1}, False)]  # fmt: skip
    if field.type == FieldDescriptor.TYPE_ENUM:
        # Unknown numbers: each use refuses them with its own status; only INTERNAL is wrong.
        return [(n, True) for n in (INT32_MIN, -1, max(v.number for v in field.enum_type.values) + 1, INT32_MAX)]
    if field.type in {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}:
        return [(float("nan"), False), (float("inf"), False), (-float("inf"), False)]
    low, high = NUMBER_RANGES[field.full_name]
    widest = WIDEST.get(field.type, (INT32_MIN, INT32_MAX))
    candidates = {widest[0], low - 1, low, high, high + 1, widest[1]}
    return [(n, low <= n <= high) for n in sorted(candidates) if widest[0] <= n <= widest[1]]


def request_with(method: Any, path: tuple[Any, ...], value: Any) -> Any:
    request = message_factory.GetMessageClass(method.input_type)()
    target = request
    for field in path[:-1]:
        nested = getattr(target, field.name)
        target = nested.add() if field.is_repeated else nested
    last = path[-1]
    if last.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(target, last.name).add(**value) if last.is_repeated else getattr(target, last.name).SetInParent()
        if not last.is_repeated:
            for name, number in value.items():
                setattr(getattr(target, last.name), name, number)
    elif last.is_repeated:
        getattr(target, last.name).append(value)
    else:
        setattr(target, last.name, value)
    return request


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(f"{f.name}[0]" if f.is_repeated and i < len(path) - 1 else f.name for i, f in enumerate(path))


def test_every_number_of_every_request_gets_a_clear_status_at_its_extremes(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Walks the contract, so that a new numeric field is covered the day it is added. As an admin
    (no rate limit applies), on the admin itself, so the calls reach past every access rule."""
    caplog.set_level(logging.INFO)
    sent = 0
    for method in SERVICE.methods:
        for path in numeric_paths(method.input_type):
            for value, in_range in extremes(path[-1]):
                request = request_with(method, path, value)
                for name in ("user_id", "id"):
                    if name in method.input_type.fields_by_name:
                        setattr(request, name, server.admin_id)
                code, error = answer(getattr(server.stub, method.name), request, streaming=method.server_streaming)
                sent += 1
                assert code not in BROKEN, (method.name, dotted(path), value, code)
                if path[-1].type == FieldDescriptor.TYPE_ENUM:
                    continue
                named = (
                    error is not None and code == grpc.StatusCode.INVALID_ARGUMENT and names_field(error, dotted(path))
                )
                assert named != in_range, (method.name, dotted(path), value, code, error and error.details())
    assert sent > 100
    assert "Traceback" not in caplog.text


def answer(call: Any, request: Any, *, streaming: bool) -> tuple[grpc.StatusCode, grpc.RpcError | None]:
    try:
        if streaming:
            for _ in call(request, timeout=0.5):
                break
        else:
            call(request, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error
    return grpc.StatusCode.OK, None
