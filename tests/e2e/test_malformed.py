"""Bytes that are no protobuf message of the request's type: INVALID_ARGUMENT "malformed request"
for every RPC, logged as one short line, never UNKNOWN with internals or a traceback."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from tests.support.calls import error_info
from tests.support.servers import RunningServer
from users.v1 import user_service_pb2 as pb

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
