"""The HTTP edge: Connect's JSON from the real curl, with error reasons and details as over gRPC."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.rpc import error_details_pb2

from tests.support.builds import BUILD_TIMEOUT
from tests.support.calls import PASSWORD, signed_up
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer

CURL = shutil.which("curl")


@pytest.fixture(autouse=True, scope="module")
def _curl_is_installed() -> None:
    # A failure, never a skip: CI must not pass without running these (.ci/setup installs curl).
    assert CURL is not None, "these tests need the curl binary"


@pytest.fixture
def http_server(start_server: StartServer) -> RunningServer:
    return start_server(http_address="127.0.0.1:0", http_max_body_bytes=4096)


def curl(server: RunningServer, path: str, body: str, *headers: str) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON with the curl binary; the HTTP status and the JSON answer."""
    assert CURL is not None
    args = [CURL, "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json"]
    for header in headers:
        args += ["-H", header]
    url = f"http://127.0.0.1:{server.app.http_port}{path}"
    done = subprocess.run([*args, "--data-binary", body, url], capture_output=True, text=True, timeout=30, check=True)
    text, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(text) if text.startswith("{") else {"text": text}


def error_info(answer: dict[str, Any]) -> error_details_pb2.ErrorInfo:
    [detail] = [d for d in answer["details"] if d["type"] == "google.rpc.ErrorInfo"]
    return error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "=="))


def test_curl_signs_in_with_json_over_connect(http_server: RunningServer, mail: MailSink) -> None:
    session = signed_up(http_server, mail, "jane")
    status, answer = curl(
        http_server,
        "/users.v1.UserService/Authenticate",
        json.dumps({"identifier": "jane", "password": PASSWORD}),
    )
    assert status == 200
    assert answer["user"]["id"] == session.user.id
    assert answer["accessToken"]
    # The token works on the other edge: the same service behind both.
    status, got = curl(
        http_server,
        "/users.v1.UserService/GetUser",
        json.dumps({"id": session.user.id}),
        f"Authorization: Bearer {answer['accessToken']}",
    )
    assert (status, got["user"]["username"]) == (200, "jane")


def test_a_refusal_over_connect_carries_its_error_info_reason(http_server: RunningServer) -> None:
    status, answer = curl(http_server, "/users.v1.UserService/GetUser", json.dumps({"id": http_server.admin_id}))
    assert status == 401
    assert answer["code"] == "unauthenticated"
    info = error_info(answer)
    assert (info.reason, info.domain) == ("UNAUTHENTICATED", "users.v1")


def test_invalid_input_over_connect_names_the_fields_as_over_grpc(http_server: RunningServer) -> None:
    status, answer = curl(http_server, "/users.v1.UserService/CreateUser", json.dumps({"username": "x"}))
    assert (status, answer["code"]) == (400, "invalid_argument")
    [bad] = [d for d in answer["details"] if d["type"] == "google.rpc.BadRequest"]
    fields = {
        v.field for v in error_details_pb2.BadRequest.FromString(base64.b64decode(bad["value"] + "==")).field_violations
    }
    assert "email" in fields


def test_a_body_that_is_no_json_of_the_request_is_a_malformed_request(http_server: RunningServer) -> None:
    status, answer = curl(http_server, "/users.v1.UserService/Authenticate", "{not json")
    assert (status, answer["code"], error_info(answer).reason) == (400, "invalid_argument", "MALFORMED_REQUEST")


def test_a_body_past_the_limit_is_refused_413(http_server: RunningServer) -> None:
    status, answer = curl(http_server, "/users.v1.UserService/Authenticate", json.dumps({"identifier": "j" * 5000}))
    assert (status, answer) == (413, {"text": "request body too large\n"})


def test_x_forwarded_for_names_no_source_over_http(start_server: StartServer) -> None:
    # uvicorn's proxy headers are on by default and trust any loopback peer (a mesh sidecar's, a
    # local client's): X-Forwarded-For became the call's source, so each spoofed address had its
    # own rate limit and password throttle. The source is the peer, as over gRPC; X-Forwarded-For
    # counts from machine callers only, and as gRPC metadata (docs/security.md).
    # Three sign-ins a window from one source: the fixture's admin signed in from this one already.
    server = start_server(http_address="127.0.0.1:0", rate_limit_requests=3, clock=FakeClock())
    sign_in = json.dumps({"identifier": "nobody", "password": "not the password at all"})
    codes = [
        curl(server, "/users.v1.UserService/Authenticate", sign_in, f"X-Forwarded-For: 198.51.100.{n}")[1]["code"]
        for n in range(3)
    ]
    assert codes == ["unauthenticated", "unauthenticated", "resource_exhausted"]


def test_behind_a_trusted_proxy_the_caller_is_the_address_it_appended(start_server: StartServer) -> None:
    # Behind an ingress every caller is the ingress: one stranger's guesses would hold everyone's
    # sign-ins there. USERS_HTTP_TRUSTED_PROXIES names it; the entry it appended is the caller, and
    # what the client put before it counts for nothing.
    server = start_server(
        http_address="127.0.0.1:0", http_trusted_proxies=("127.0.0.0/8",), rate_limit_requests=3, clock=FakeClock()
    )
    sign_in = json.dumps({"identifier": "nobody", "password": "not the password at all"})
    codes = [
        curl(server, "/users.v1.UserService/Authenticate", sign_in, f"X-Forwarded-For: 192.0.2.{n}, 198.51.100.7")[1][
            "code"
        ]
        for n in range(4)
    ]
    assert codes == ["unauthenticated"] * 3 + ["resource_exhausted"]
    other = curl(server, "/users.v1.UserService/Authenticate", sign_in, "X-Forwarded-For: 198.51.100.8")[1]
    assert other["code"] == "unauthenticated"


@BUILD_TIMEOUT
def test_a_node_client_calls_over_connect_and_grpc_web_and_reads_a_refusal_reason(
    http_server: RunningServer, mail: MailSink, ts_build: Path
) -> None:
    session = signed_up(http_server, mail, "nodejane")
    done = subprocess.run(
        ["node", "dist/examples/http-edge.js", f"http://127.0.0.1:{http_server.app.http_port}", "nodejane"],
        cwd=ts_build,
        env={**os.environ, "EXAMPLE_PASSWORD": PASSWORD},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"connect: signed in as nodejane ({session.user.id})",
        "connect: GetUserByIdentifier refused: PERMISSION_DENIED",
        "connect: WatchUserChanges refused: PERMISSION_DENIED",
        f"grpc-web: signed in as nodejane ({session.user.id})",
        "grpc-web: GetUserByIdentifier refused: PERMISSION_DENIED",
        "grpc-web: WatchUserChanges refused: PERMISSION_DENIED",
    ]
