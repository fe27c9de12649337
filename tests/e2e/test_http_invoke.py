"""The HTTP edge's call: the same pipeline as a gRPC call, through App.invoke."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users_grpc.http_api.invoke import CallFailed, HttpCall

ANONYMOUS = HttpCall(metadata=(), peer="ipv4:127.0.0.1:5555")


def error_reason(failed: CallFailed) -> str:
    for detail in failed.status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def test_an_admin_call_through_invoke_answers_as_over_grpc(server: RunningServer) -> None:
    call = HttpCall(metadata=(("authorization", f"Bearer {server.admin_token}"),), peer="ipv4:127.0.0.1:5555")
    response = server.call(
        server.app.invoke("/users.v1.UserService/GetUser", pb.GetUserRequest(id=server.admin_id), call)
    )
    assert isinstance(response, pb.GetUserResponse)
    assert response.user.id == server.admin_id


def test_an_anonymous_call_is_refused_by_the_access_rules_with_its_reason(server: RunningServer) -> None:
    request = pb.GetUserRequest(id=server.admin_id)
    with pytest.raises(CallFailed) as refused:
        server.call(server.app.invoke("/users.v1.UserService/GetUser", request, ANONYMOUS))
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(refused.value) == "UNAUTHENTICATED"


def test_a_call_through_invoke_is_traced_and_logged_as_a_grpc_call(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = start_server(tracer_provider=provider)
    caplog.set_level(logging.INFO, logger="users_grpc.calls")
    # The caller's trace is continued, on either edge: its traceparent names the trace and the parent span.
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traceparent = ("traceparent", f"00-{trace_id}-{parent_id}-01")
    call = HttpCall(metadata=(("x-request-id", "http-7"), traceparent), peer="ipv4:192.0.2.9:5555")
    server.call(server.app.invoke("/users.v1.UserService/GetPublicKeys", pb.GetPublicKeysRequest(), call))
    server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest(), metadata=(traceparent,))
    spans = [span for span in exporter.get_finished_spans() if span.name == "/users.v1.UserService/GetPublicKeys"]
    assert len(spans) == 2
    for span in spans:
        assert span.parent is not None
        assert (format(span.context.trace_id, "032x"), format(span.parent.span_id, "016x")) == (trace_id, parent_id)
    [line] = [r for r in caplog.records if r.name == "users_grpc.calls" and getattr(r, "request_id", "") == "http-7"]
    assert (getattr(line, "code", ""), getattr(line, "peer", ""), getattr(line, "source", "")) == (
        "OK",
        "ipv4:192.0.2.9:5555",
        "192.0.2.9",
    )
