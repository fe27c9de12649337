"""Operating the server: health that follows the database, outages, mail outages,
reflection for grpcurl, grpc-health-probe, and draining on SIGTERM."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from tests.support.calls import (
    NOT_SERVING,
    SERVICE,
    SERVING,
    ServeProcess,
    create_request,
    health_stub,
    raw_collection,
    retry_delay,
    rpc_error,
    stored_users,
    wait_until,
)
from tests.support.mail import MailSink, SocketController
from tests.support.paths import REPO_ROOT
from tests.support.servers import KEY_ENCRYPTION_KEY, RunningServer, StartServer
from tests.support.sockets import bound_socket, port_of
from tests.support.stores import stop
from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc
from users_grpc.ops.devdb import DevDatabase

TOOLS = Path(os.environ.get("USERS_TOOLS_BIN", REPO_ROOT / ".tools/bin"))


def tool(name: str) -> str:
    path = TOOLS / name
    # Installed by .ci/setup; a missing tool is a broken setup, not a reason to skip.
    assert path.exists(), f"{path} is missing: run .ci/setup"
    return str(path)


def health_status(server: RunningServer, service: str = SERVICE) -> int:
    stub = health_stub(server.channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return status


def probe(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("grpc-health-probe"), "-addr", address, "-service", SERVICE, "-connect-timeout=2s", "-rpc-timeout=2s"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_health_reports_serving_for_the_server_and_the_service(server: RunningServer) -> None:
    assert health_status(server, "") == SERVING
    assert health_status(server, SERVICE) == SERVING
    result = probe(server.address)
    assert result.returncode == 0, result.stderr
    assert "status: SERVING" in result.stdout + result.stderr


def test_database_outage_is_unavailable_and_recovers_without_restart(
    own_database: DevDatabase, start_server: StartServer, mail: MailSink
) -> None:
    """Paused database: health NOT_SERVING, RPCs UNAVAILABLE fast, nothing half-written; then back."""
    server = start_server(mongodb_uri=own_database.uri, db_timeout_seconds=1.0)
    watch = health_stub(server.channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=150)
    assert next(watch).status == SERVING

    stop(own_database)
    wait_until(lambda: health_status(server) == NOT_SERVING, what="NOT_SERVING")
    assert next(watch).status == NOT_SERVING
    assert health_status(server, "") == NOT_SERVING
    assert health_status(server, "liveness") == SERVING  # a liveness probe does not restart the pod
    result = probe(server.address)
    assert result.returncode != 0
    assert "NOT_SERVING" in result.stdout + result.stderr

    started = time.monotonic()
    error = rpc_error(server.stub.CreateUser, create_request(), timeout=10)
    assert error.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert time.monotonic() - started < 5
    assert "Traceback" not in (error.details() or "")
    error = rpc_error(server.stub.GetUser, pb.GetUserRequest(id="0" * 24), timeout=0.5)
    assert error.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

    os.kill(own_database.process.pid, signal.SIGCONT)
    wait_until(lambda: health_status(server) == SERVING, what="SERVING again")
    assert next(watch).status == SERVING
    assert probe(server.address).returncode == 0
    # Nothing was half-created by the failed call, and the same registration now works.
    assert len(stored_users(own_database.uri, server.settings.mongodb_database, username="jane")) <= 1
    # The timed-out call's write may have landed after all (then it is whole): ALREADY_EXISTS.
    retry = server.stub.CreateUser.future(create_request()).exception(timeout=60)
    assert retry is None or (isinstance(retry, grpc.RpcError) and retry.code() == grpc.StatusCode.ALREADY_EXISTS)
    [stored] = stored_users(own_database.uri, server.settings.mongodb_database, username="jane")
    assert stored["password_hash"].startswith("$2b$")
    assert mail.code_for("jane@example.com")


def test_dead_smtp_server_delays_mail_without_failing_or_losing_it(start_server: StartServer, mongodb_uri: str) -> None:
    """CreateUser answers at once while SMTP is down; the mail goes out once SMTP is back."""
    dead = bound_socket()  # refuses connections until the SMTP server below listens on it
    server = start_server(smtp_port=port_of(dead), mail_retry_seconds=0.1, smtp_timeout_seconds=0.5)
    started = time.monotonic()
    server.stub.CreateUser(create_request())
    assert time.monotonic() - started < 2
    with raw_collection(mongodb_uri, server.settings.mongodb_database, "outbox") as outbox:
        wait_until(lambda: outbox.count_documents({"attempts": {"$gte": 2}}) == 1, what="two failed deliveries")
        sink = MailSink()
        controller = SocketController(sink, dead)
        controller.start()
        try:
            assert sink.code_for("jane@example.com")
            # Deleted once delivered: nothing is left that could go out a second time.
            wait_until(lambda: outbox.count_documents({}) == 0, what="an empty outbox")
            assert len(sink.messages) == 1
        finally:
            controller.stop()


def test_reflection_lets_grpcurl_list_and_call(server: RunningServer) -> None:
    listing = subprocess.run(
        [tool("grpcurl"), "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=30, check=True
    )
    assert SERVICE in listing.stdout.split()
    keys = subprocess.run(
        [tool("grpcurl"), "-plaintext", server.address, f"{SERVICE}/GetPublicKeys"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "jwks_json" in keys.stdout
    protected = subprocess.run(
        [tool("grpcurl"), "-plaintext", "-d", '{"id": "' + "0" * 24 + '"}', server.address, f"{SERVICE}/GetUser"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Unauthenticated" in protected.stderr


def test_reflection_describes_rpcs_with_their_comments(server: RunningServer) -> None:
    def describe(symbol: str) -> str:
        described = subprocess.run(
            [tool("grpcurl"), "-plaintext", server.address, "describe", symbol],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert described.returncode == 0, described.stderr
        return described.stdout

    method = describe(f"{SERVICE}.EnableMfa")
    assert "Start a TOTP enrollment, with the current password" in method
    assert "Callers: the user themself." in method
    reasons = describe("users.v1.ErrorReason")
    assert "ERROR_REASON_MFA_REQUIRED = 14;" in reasons
    assert "the password was right but MFA is on" in reasons
    # Files from outside the contract's descriptor set are still served.
    assert "rpc Check" in describe("grpc.health.v1.Health")


def test_reflection_can_be_turned_off(start_server: StartServer) -> None:
    server = start_server(reflection=False)
    listing = subprocess.run(
        [tool("grpcurl"), "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=30, check=False
    )
    assert listing.returncode != 0
    assert "server does not support the reflection API" in listing.stderr
    # Only reflection is off: the server itself answers.
    assert server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest(), timeout=10).jwks_json


def test_sigterm_drains_in_flight_calls_then_exits(mongodb_uri: str, database_name: str, tmp_path: Path) -> None:
    """On SIGTERM, health turns NOT_SERVING, the running CreateUser completes, and the process exits 0."""
    serve = ServeProcess(
        USERS_MONGODB_URI=mongodb_uri,
        USERS_MONGODB_DATABASE=database_name,
        USERS_MAIL_DIR=str(tmp_path / "mail"),
        # A slow hash keeps the call in flight while the signal arrives.
        USERS_BCRYPT_ROUNDS="15",
        USERS_HASH_WORKERS="1",
        USERS_SHUTDOWN_DELAY_SECONDS="0.5",
        USERS_SHUTDOWN_GRACE_SECONDS="20",
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serve.port()}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            health = health_stub(channel)
            wait_until(
                lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status == SERVING
            )
            # Opened before the signal, the watch hears of NOT_SERVING whenever it comes: no window to hit.
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
            assert next(watch).status == SERVING
            in_flight = user_service_pb2_grpc.UserServiceStub(channel).CreateUser.future(create_request(), timeout=30)
            # The call is in the server once its source is counted against the rate limit.
            with raw_collection(mongodb_uri, database_name, "throttles") as throttles:
                wait_until(lambda: throttles.count_documents({"_id": {"$regex": "^rate:"}}) > 0, what="the call")
            serve.process.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            assert in_flight.result(timeout=30).user.username == "jane"
        assert serve.process.wait(timeout=25) == 0
    finally:
        serve.close()
    assert not any("Traceback" in line for line in serve.lines)


def test_the_concurrency_cap_refuses_user_service_calls_but_never_health_checks(start_server: StartServer) -> None:
    """Past USERS_MAX_CONCURRENT_RPCS a UserService call is refused at once, with a retry delay;
    health checks (what Kubernetes probes) answer SERVING however full the cap is."""
    server = start_server(max_concurrent_rpcs=2, bcrypt_rounds=14, hash_workers=1)
    refused = threading.Event()

    def on_done(future: Any) -> None:
        error = future.exception(timeout=60)
        if error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            refused.set()

    # Sign-ins of unknown users: each costs a bcrypt run at cost 14, one at a time, so two fill the cap for seconds.
    burst = []
    for n in range(6):
        request = pb.AuthenticateRequest(identifier=f"nobody{n}", password="a wrong password")
        burst.append(server.anonymous.Authenticate.future(request, timeout=60))
        burst[-1].add_done_callback(on_done)
    assert refused.wait(30), "no call was refused"
    # The cap is full now; these must not count against it nor be refused by it.
    health = health_stub(server.channel)
    checks = [health.Check.future(health_pb2.HealthCheckRequest(service=s), timeout=10) for s in ("", SERVICE) * 5]
    assert [check.result(timeout=60).status for check in checks] == [SERVING] * 10
    # Still full after the checks (only finishing sign-ins free a place): they really ran against a full cap.
    error = rpc_error(server.anonymous.GetPublicKeys, pb.GetPublicKeysRequest())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < retry_delay(error) <= 5
    codes = [f.exception(timeout=60).code() if f.exception(timeout=60) else grpc.StatusCode.OK for f in burst]  # type: ignore[union-attr]
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 2
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4
    # Once the sign-ins are done the cap has room again.
    assert server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json


def test_start_up_without_a_database_answers_health_and_stops_at_once_on_sigterm() -> None:
    """Alive but not ready while the database is unreachable; the retry log names the database
    (no password) and the cause; SIGTERM ends it within a second."""
    with socket.socket() as unreachable:
        unreachable.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        db_port = unreachable.getsockname()[1]
        serve = ServeProcess(
            USERS_MONGODB_URI=f"mongodb://app:s3cret-pw@127.0.0.1:{db_port}/",
            USERS_DB_TIMEOUT_SECONDS="0.3",
        )
        try:
            address = f"127.0.0.1:{serve.port()}"
            with grpc.insecure_channel(address) as channel:
                health = health_stub(channel)
                statuses = {
                    name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                    for name in ("", SERVICE, "liveness")
                }
                assert statuses == {"": NOT_SERVING, SERVICE: NOT_SERVING, "liveness": SERVING}
                stub = user_service_pb2_grpc.UserServiceStub(channel)
                error = rpc_error(stub.GetPublicKeys, pb.GetPublicKeysRequest(), timeout=5)
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            wait_until(lambda: bool(serve.logged("database not ready; retrying")), what="a retry line")
            retry = serve.logged("database not ready; retrying")[0]
            assert retry["database"] == f"mongodb://app:***@127.0.0.1:{db_port}/"
            # One line, the host and why, without PyMongo's topology dump.
            assert retry["cause"].startswith(f"127.0.0.1:{db_port}: [Errno 111] ")
            assert "Topology" not in retry["cause"]
            assert "configured timeouts" not in retry["cause"]
            assert "s3cret-pw" not in "".join(serve.lines)
            started = time.monotonic()
            serve.process.send_signal(signal.SIGTERM)
            assert serve.process.wait(timeout=5) == 0
            assert time.monotonic() - started < 1.5
            assert not any("Traceback" in line for line in serve.lines)
        finally:
            serve.close()


def test_a_busy_address_is_a_clear_start_up_error(server: RunningServer) -> None:
    """No port sharing: a second server on the same address refuses to start, saying why."""
    result = subprocess.run(
        [sys.executable, "-m", "users_grpc", "serve"],
        env={
            **os.environ,
            "USERS_GRPC_ADDRESS": server.address,
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
    assert f"USERS_GRPC_ADDRESS={server.address}: cannot listen there" in result.stderr
    assert "Traceback" not in result.stderr


def test_grpcurl_decodes_an_errors_details(server: RunningServer) -> None:
    """Reflection serves google/rpc/error_details.proto, so grpcurl prints the ErrorInfo's
    reason and the BadRequest's field violations instead of a base64 blob."""
    refused = subprocess.run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-d",
            '{"username": "jane", "email": "not-an-email", "password": "x", "password_confirmation": "x"}',
            server.address,
            f"{SERVICE}/CreateUser",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Code: InvalidArgument" in refused.stderr, refused.stderr
    assert "is not recognized" not in refused.stderr
    assert '"@type": "type.googleapis.com/google.rpc.ErrorInfo"' in refused.stderr
    assert '"reason": "INVALID_ARGUMENT"' in refused.stderr
    assert '"@type": "type.googleapis.com/google.rpc.BadRequest"' in refused.stderr
    assert '"field": "email"' in refused.stderr


def test_serve_warns_once_of_a_mistyped_setting_naming_the_nearest(
    mongodb_uri: str, database_name: str, tmp_path: Path
) -> None:
    serve = ServeProcess(
        USERS_MONGODB_URI=mongodb_uri,
        USERS_MONGODB_DATABASE=database_name,
        USERS_MAIL_DIR=str(tmp_path / "mail"),
        USERS_BCRYPT_ROUND="10",
    )
    try:
        serve.port()
        warnings = [
            record for record in serve.logged("unknown setting ignored") if record["variable"] == "USERS_BCRYPT_ROUND"
        ]
        assert [(record["level"], record["did_you_mean"]) for record in warnings] == [
            ("warning", "USERS_BCRYPT_ROUNDS")
        ]
    finally:
        serve.close()
