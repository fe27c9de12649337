"""What an operator sees: Prometheus metrics and the key set over HTTP, a JSON line per call with
its request id, and OpenTelemetry traces of calls and their database commands."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    ServeProcess,
    create_request,
    independent_totp,
    lines_holding,
    reset_token,
    rpc_error,
    signed_up,
    wait_until,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.paths import REPO_ROOT
from tests.support.servers import KEY_ENCRYPTION_KEY, RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc
from users_grpc.domain.errors import ConfigError
from users_grpc.grpc_api.logs import JsonFormatter
from users_grpc.grpc_api.tracing import tracer_provider_from_env, tracing_switched_on
from users_grpc.http_api.server import RequestInTime

WRONG_PASSWORD = "not the password at all"


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """The status, the headers (looked up by any letter case, as HTTP names them) and the body."""
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - the test's own server
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def scrape(server: RunningServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics, by name and labels, parsed by prometheus_client's own parser."""
    status, headers, body = http_get(f"http://127.0.0.1:{server.app.http_port}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_metrics_count_calls_refusals_throttles_and_read_the_gauges(start_server: StartServer, mail: MailSink) -> None:
    # A fake clock: the one-second hold after the free try may not end between two calls.
    server = start_server(http_address="127.0.0.1:0", password_free_attempts=1, clock=FakeClock())
    session = signed_up(server, mail)
    wrong = pb.AuthenticateRequest(identifier="jane", password=WRONG_PASSWORD)
    codes = [rpc_error(server.anonymous.Authenticate, wrong).code() for _ in range(3)]
    assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # the throttle holds the later tries
    server.stub_for(session.access_token).GetUser(pb.GetUserRequest(id=session.user.id))

    samples = scrape(server)
    assert value(samples, "users_grpc_calls_total", method="CreateUser", code="OK") == 1
    assert value(samples, "users_grpc_calls_total", method="Authenticate", code="OK") == 2  # the admin and jane
    assert value(samples, "users_grpc_calls_total", method="Authenticate", code="UNAUTHENTICATED") == 1
    assert value(samples, "users_grpc_calls_total", method="GetUser", code="OK") == 1
    assert value(samples, "users_grpc_call_duration_seconds_count", method="Authenticate") == 2 + 3
    assert value(samples, "users_grpc_calls_in_progress") == 0
    assert value(samples, "users_grpc_sign_in_failures_total", method="Authenticate", reason="INVALID_CREDENTIALS") == 1
    held = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert value(samples, "users_grpc_throttle_holds_total", method="Authenticate", reason="TOO_MANY_ATTEMPTS") == held
    assert value(samples, "users_grpc_refusals_total", method="Authenticate", reason="TOO_MANY_ATTEMPTS") == held
    # Each sign-in, the wrong ones too, ran one bcrypt job; none is in line now.
    assert value(samples, "users_grpc_hash_wait_seconds_count") >= 4
    assert value(samples, "users_grpc_hash_jobs") == 0
    assert value(samples, "users_grpc_hash_capacity") == 2 + 64
    assert value(samples, "users_grpc_database_up") == 1
    assert 0 <= value(samples, "users_grpc_signing_key_age_seconds") < 600
    assert value(samples, "users_grpc_outbox_failed") == 0


def test_outbox_gauges_show_mail_waiting_while_smtp_is_down(
    start_server: StartServer, mail: MailSink, dead_smtp_port: int
) -> None:
    """A second server in the same process: each keeps its own registry."""
    clock = FakeClock()
    server = start_server(clock=clock, http_address="127.0.0.1:0", smtp_port=dead_smtp_port)
    server.anonymous.CreateUser(create_request())
    clock.advance(seconds=90)
    samples = scrape(server)
    assert value(samples, "users_grpc_outbox_pending") == 1
    assert value(samples, "users_grpc_outbox_oldest_pending_age_seconds") >= 90
    assert value(samples, "users_grpc_calls_total", method="CreateUser", code="OK") == 1


def test_the_key_set_over_http_is_get_public_keys_and_verifies_tokens(start_server: StartServer) -> None:
    # "[::]", as in the Kubernetes ConfigMap, listens on IPv4 too.
    server = start_server(http_address="[::]:0", key_reload_seconds=30)
    url = f"http://127.0.0.1:{server.app.http_port}/.well-known/jwks.json"
    status, headers, body = http_get(url)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "public, max-age=30"
    assert body.decode() == server.stub.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json
    assert http_get(url, {"If-None-Match": headers["ETag"]})[0] == 304

    # A standard JWKS client, given only the URL, verifies a token issued over gRPC.
    signing_key = jwt.PyJWKClient(url).get_signing_key_from_jwt(server.admin_token)
    claims = jwt.decode(server.admin_token, signing_key, algorithms=["ES256"], audience=server.settings.jwt_audience)
    assert claims["sub"] == server.admin_id

    assert http_get(f"http://127.0.0.1:{server.app.http_port}/other")[0] == 404


def test_without_an_http_address_nothing_listens(server: RunningServer) -> None:
    assert server.app.http_port is None
    assert server.app.http is None


def test_a_busy_http_address_is_a_clear_start_up_error(start_server: StartServer) -> None:
    server = start_server(http_address="127.0.0.1:0")
    busy = f"127.0.0.1:{server.app.http_port}"
    result = subprocess.run(
        [sys.executable, "-m", "users_grpc", "serve"],
        env={
            **os.environ,
            "USERS_GRPC_ADDRESS": "127.0.0.1:0",
            "USERS_HTTP_ADDRESS": busy,
            "USERS_MONGODB_URI": server.settings.mongodb_uri,
            "USERS_KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(KEY_ENCRYPTION_KEY).decode(),
        },
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"USERS_HTTP_ADDRESS={busy}: cannot listen there" in result.stderr
    assert "Traceback" not in result.stderr


class HeldCollector(Collector):
    """A collector whose render waits until the test lets it go: a render as slow as a test wants."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.renders = 0
        self.threads: set[str] = set()

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registered without being collected

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.renders += 1
        self.threads.add(threading.current_thread().name)
        self.released.wait(timeout=60)
        yield GaugeMetricFamily("held_collector", "A collector the test holds", value=1)


def test_a_page_being_rendered_holds_up_no_grpc_call_and_every_scrape_meanwhile_shares_it(
    start_server: StartServer,
) -> None:
    """However slow a render, the loop serving gRPC keeps serving: the render runs in another
    thread, and a flood of scrapers waits for that one render instead of starting its own."""
    server = start_server(http_address="127.0.0.1:0")
    assert server.app.http is not None
    metrics = server.app.http.metrics
    held = HeldCollector()
    metrics.registry.register(held)
    scrapers = 8
    url = f"http://127.0.0.1:{server.app.http_port}/metrics"
    with concurrent.futures.ThreadPoolExecutor(scrapers) as pool:
        try:
            pages = [pool.submit(http_get, url) for _ in range(scrapers)]
            wait_until(lambda: held.renders == 1, what="a render under way")
            # On the loop, the render would hold every call until its deadline.
            for _ in range(20):
                assert server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest(), timeout=5).jwks_json
            wait_until(lambda: metrics.scrapes_waiting == scrapers, what="every scrape waiting for the page")
            assert held.renders == 1
        finally:
            held.released.set()
        answers = [page.result(timeout=30) for page in pages]
    assert [status for status, _, _ in answers] == [200] * scrapers
    assert all(b"held_collector 1.0" in body for _, _, body in answers)
    assert held.renders == 1
    assert held.threads == {"metrics-render_0"}  # never "server-loop", the thread of the test server's loop
    # The next scrape renders anew.
    assert scrape(server)["held_collector"] == {(): 1.0}
    assert held.renders == 2


def half_sent_request(port: int) -> socket.socket:
    """A connection that sends the start of a request's head, never its end."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: users-grpc\r\n")
    return connection


def test_http_connections_past_the_cap_are_refused_at_once_and_half_sent_requests_time_out(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(http_address="127.0.0.1:0", http_max_connections=3)
    http = server.app.http
    assert http is not None
    assert server.app.http_port is not None
    port = server.app.http_port
    # Long enough that the held connections outlast this part of the test on a loaded machine.
    monkeypatch.setattr(RequestInTime, "read_seconds", 120.0)  # the one knob a test needs, not a setting
    idle = [half_sent_request(port) for _ in range(3)]
    try:
        wait_until(lambda: http.connections_open == 3, what="three connections held")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            extra.sendall(b"GET /metrics HTTP/1.1\r\nHost: users-grpc\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := extra.recv(4096):  # the server closes it: recv ends, within the timeout
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        wait_until(lambda: http.connections_open == 3, what="the refused connection closed")
        idle.pop().close()
        wait_until(lambda: http.connections_open == 2, what="a place freed")
        assert scrape(server)["users_grpc_calls_in_progress"] == {(): 0.0}
    finally:
        for connection in idle:
            connection.close()
    wait_until(lambda: http.connections_open == 0, what="every connection closed")
    # A request's head that never ends is given up after the read time, its place freed.
    monkeypatch.setattr(RequestInTime, "read_seconds", 0.2)
    with half_sent_request(port) as stalled:
        assert stalled.recv(4096) == b""  # closed by the server, unanswered (the socket's timeout is 10 s)
    wait_until(lambda: http.connections_open == 0, what="the stalled connection dropped")
    # So is a body that never ends, and the head of a later request on a kept-alive connection
    # (its first byte stopped the keep-alive timer): either held its place for ever, and
    # max_connections of them refused every client, /metrics and the key set too.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        stalled.sendall(b"POST /scim/v2/Users HTTP/1.1\r\nHost: users-grpc\r\nContent-Length: 100\r\n\r\n{")
        assert stalled.recv(4096) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        stalled.sendall(b"GET /nothing HTTP/1.1\r\nHost: users-grpc\r\n\r\n")
        answer = b""
        while not answer.endswith(b"not found\n"):  # the whole first answer (a 404 of ten bytes)
            chunk = stalled.recv(4096)
            assert chunk, "closed before the first answer"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: users-grpc\r\n")
        assert stalled.recv(4096) == b""
    wait_until(lambda: http.connections_open == 0, what="the stalled connections dropped")


def trailing(metadata: Any) -> dict[str, Any]:
    return {key: value for key, value in metadata}


def call_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, Any]]:
    """The call lines, once there are ``count``: a line is written as its call ends, which may be
    just after the caller has its answer."""
    formatter = JsonFormatter()

    def lines() -> list[dict[str, Any]]:
        return [json.loads(formatter.format(r)) for r in list(caplog.records) if r.name == "users_grpc.calls"]

    wait_until(lambda: len(lines()) >= count, what=f"{count} call lines")
    return lines()


def test_each_call_logs_one_line_and_returns_its_request_id(
    server: RunningServer, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    session = signed_up(server, mail)
    own = server.stub_for(session.access_token)
    _, call = own.GetUser.with_call(pb.GetUserRequest(id=session.user.id), metadata=(("x-request-id", "req-42"),))
    assert ("x-request-id", "req-42") in call.trailing_metadata()
    error = rpc_error(own.GetUser, pb.GetUserRequest(id=server.admin_id))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    made = trailing(error.trailing_metadata())["x-request-id"]
    assert len(made) == 32
    # A request id that could forge log content is replaced, not echoed.
    _, call = own.GetUser.with_call(
        pb.GetUserRequest(id=session.user.id), metadata=(("x-request-id", 'forged" "level": "error'),)
    )
    assert len(trailing(call.trailing_metadata())["x-request-id"]) == 32

    lines = call_lines(caplog, 6)
    [given] = [line for line in lines if line["request_id"] == "req-42"]
    assert given["message"] == "rpc"
    assert given["rpc"] == "/users.v1.UserService/GetUser"
    assert given["code"] == "OK"
    assert given["duration_ms"] >= 0
    assert given["peer"].startswith("ipv4:127.0.0.1:")
    assert (given["source"], given["caller_user_id"], given["caller_session_id"]) == (
        "127.0.0.1",
        session.user.id,
        session.session_id,
    )
    [refused] = [line for line in lines if line["request_id"] == made]
    assert (refused["code"], refused["reason"], refused["caller_user_id"]) == (
        "PERMISSION_DENIED",
        "PERMISSION_DENIED",
        session.user.id,
    )
    # One line per call: the sign-up's three calls, then the three GetUser calls.
    assert [line["rpc"].rpartition("/")[2] for line in lines] == [
        "CreateUser",
        "ActivateUser",
        "Authenticate",
        "GetUser",
        "GetUser",
        "GetUser",
    ]


def test_an_unexpected_error_is_one_line_with_its_traceback_as_a_field(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def broken() -> Any:
        raise RuntimeError("a bug")

    server.app.services.tokens.jwks = broken  # type: ignore[method-assign]
    error = rpc_error(server.stub.GetPublicKeys, pb.GetPublicKeysRequest())
    assert error.code() == grpc.StatusCode.INTERNAL
    [record] = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "RuntimeError: a bug" in json.loads(line)["exception"]
    [call] = [line for line in call_lines(caplog, 1) if line["rpc"].endswith("/GetPublicKeys")]
    assert call["code"] == "INTERNAL"


def test_a_whole_flow_logs_no_password_code_token_or_secret(
    start_server: StartServer, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    server = start_server(clock=clock)
    session = signed_up(server, mail)
    activation_code = mail.code_for("jane@example.com")
    assert rpc_error(
        server.anonymous.Authenticate, pb.AuthenticateRequest(identifier="jane", password=WRONG_PASSWORD)
    ).code() == (grpc.StatusCode.UNAUTHENTICATED)
    refreshed = server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=session.refresh_token))

    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    server.anonymous.ResetPassword(
        pb.ResetPasswordRequest(token=token, new_password=NEW_PASSWORD, new_password_confirmation=NEW_PASSWORD)
    )
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=NEW_PASSWORD))
    own = server.stub_for(signed_in.access_token)
    enrollment = own.EnableMfa(pb.EnableMfaRequest(user_id=signed_in.user.id, password=NEW_PASSWORD))
    confirming = independent_totp(enrollment.secret, clock.now().timestamp())
    recovery = own.ConfirmMfa(pb.ConfirmMfaRequest(user_id=signed_in.user.id, code=confirming)).recovery_codes
    clock.advance(seconds=30)
    totp = independent_totp(enrollment.secret, clock.now().timestamp())
    with_mfa = server.anonymous.Authenticate(
        pb.AuthenticateRequest(identifier="jane", password=NEW_PASSWORD, totp_code=totp)
    )
    with_recovery = server.anonymous.Authenticate(
        pb.AuthenticateRequest(identifier="jane", password=NEW_PASSWORD, recovery_code=recovery[0])
    )
    wait_until(lambda: len(mail.messages) >= 4, what="the notices")

    call_lines(caplog, 13)  # every call of the flow (the admin's sign-in too), each in one line
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(r) for r in caplog.records if r.name != "mail.log")
    secrets = [
        PASSWORD,
        WRONG_PASSWORD,
        NEW_PASSWORD,
        activation_code,
        token,
        enrollment.secret,
        enrollment.otpauth_uri,
        confirming,
        totp,
        *recovery,
        server.admin_token,
        *(s.access_token for s in (session, refreshed, signed_in, with_mfa, with_recovery)),
        *(s.refresh_token for s in (session, refreshed, signed_in, with_mfa, with_recovery)),
    ]
    for secret in secrets:
        assert not lines_holding(secret, logged)


def test_traces_hold_a_server_span_per_call_with_its_database_spans_beneath(
    start_server: StartServer, mail: MailSink
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = start_server(tracer_provider=provider)
    exporter.clear()
    server.stub.GetUser(pb.GetUserRequest(id=server.admin_id))
    server.anonymous.CreateUser(create_request())

    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    calls = [span for span in spans if span.kind is SpanKind.SERVER]
    assert sorted(span.name for span in calls) == [
        "/users.v1.UserService/CreateUser",
        "/users.v1.UserService/GetUser",
    ]
    for call in calls:
        beneath = [
            span
            for span in spans
            if span.kind is SpanKind.CLIENT and span.parent is not None and span.parent.span_id == call.context.span_id
        ]
        assert beneath, f"no database span beneath {call.name}"
        for span in beneath:
            assert span.context.trace_id == call.context.trace_id
            assert span.attributes is not None
            assert span.attributes.get("db.system") == "mongodb"
            assert span.parent is not None
            assert by_id[span.parent.span_id] is call
    [get_user] = [call for call in calls if call.name.endswith("/GetUser")]
    names = {span.name for span in spans if span.parent and span.parent.span_id == get_user.context.span_id}
    assert any(name.endswith(".find") for name in names), names
    provider.shutdown()


def test_tracing_is_switched_on_by_the_standard_variables_only() -> None:
    assert not tracing_switched_on({})
    assert tracer_provider_from_env({}) is None
    assert not tracing_switched_on({"OTEL_TRACES_EXPORTER": "none"})
    assert tracing_switched_on({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing_switched_on({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_switched_on({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
    provider = tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "users-grpc"
    provider.shutdown()
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER=no-such-exporter"):
        tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "no-such-exporter"})


def test_a_stream_is_one_call_line_and_counted_when_it_ends(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """WatchUserChanges is logged and counted like any call: once, when it ends, however it ends."""
    caplog.set_level(logging.INFO)
    server = start_server(http_address="127.0.0.1:0")
    server.stub.CreateUser(create_request())  # a change to watch
    error = rpc_error(
        lambda r: list(server.stub.WatchUserChanges(r, metadata=(("x-request-id", "bad-cursor"),), timeout=10)),
        pb.WatchUserChangesRequest(after="nonsense"),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(error.trailing_metadata())["x-request-id"] == "bad-cursor"
    stream = server.stub.WatchUserChanges(
        pb.WatchUserChangesRequest(), metadata=(("x-request-id", "left"),), timeout=30
    )
    assert next(stream).change.cursor
    open_now = scrape(server)
    assert value(open_now, "users_grpc_streams_open") == 1
    assert value(open_now, "users_grpc_calls_in_progress") == 0  # unary calls only, as the limit counts them
    stream.cancel()  # the client leaves while the server waits for the next change

    def watch_lines() -> dict[str, dict[str, Any]]:
        formatter = JsonFormatter()
        lines = [json.loads(formatter.format(r)) for r in list(caplog.records) if r.name == "users_grpc.calls"]
        return {line["request_id"]: line for line in lines if line["rpc"].endswith("/WatchUserChanges")}

    wait_until(lambda: len(watch_lines()) == 2, what="a line for each stream")
    # Closed all the way down by the time its line is written: the feed reads for it no more.
    assert server.app.services.changes.watchers == 0
    lines = watch_lines()
    refused, left = lines["bad-cursor"], lines["left"]
    assert (refused["code"], refused["caller_user_id"]) == ("INVALID_ARGUMENT", server.admin_id)
    assert (left["code"], left["caller_user_id"], left["source"]) == ("CANCELLED", server.admin_id, "127.0.0.1")
    samples = scrape(server)
    assert value(samples, "users_grpc_calls_total", method="WatchUserChanges", code="INVALID_ARGUMENT") == 1
    assert value(samples, "users_grpc_calls_total", method="WatchUserChanges", code="CANCELLED") == 1
    assert value(samples, "users_grpc_refusals_total", method="WatchUserChanges", reason=refused["reason"]) == 1
    assert value(samples, "users_grpc_streams_open") == 0
    # How long a client watched is no latency: streams stay out of the duration histogram.
    assert (("method", "WatchUserChanges"),) not in samples["users_grpc_call_duration_seconds_count"]


def test_a_serving_process_logs_a_stream_its_client_left_and_keeps_serving(
    server: RunningServer, tmp_path: Path
) -> None:
    """The line of a stream its client left is written when grpc has let go of the call: written
    from what was read at the start, it must not ask the call (that crashed the process)."""
    serve = ServeProcess(
        USERS_MONGODB_URI=server.settings.mongodb_uri,
        USERS_MONGODB_DATABASE=server.settings.mongodb_database,
        USERS_MAIL_DIR=str(tmp_path / "mail"),
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serve.port()}") as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            metadata = (("authorization", f"Bearer {server.admin_token}"),)
            wait_until(lambda: bool(serve.logged("serving")), what="the serving line")
            for _ in range(3):
                stream = stub.WatchUserChanges(pb.WatchUserChangesRequest(), metadata=metadata, timeout=30)
                assert next(stream).change.user_id == server.admin_id
                stream.cancel()

            def left() -> list[dict[str, Any]]:
                return [line for line in serve.logged("rpc") if line["rpc"].endswith("/WatchUserChanges")]

            wait_until(lambda: len(left()) == 3, what="a line for each stream left")
            assert {line["code"] for line in left()} == {"CANCELLED"}
            assert serve.process.poll() is None
            keys = stub.GetPublicKeys(pb.GetPublicKeysRequest(), timeout=10)
            assert json.loads(keys.jwks_json)["keys"]
    finally:
        serve.close()
