"""Proof under replicas and faults (issue 9): two server processes on one database, the database
killed under load and brought back, SMTP down while users register, SIGTERM under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2
from pymongo import MongoClient

from tests.support.calls import (
    NOT_SERVING,
    PASSWORD,
    SERVICE,
    SERVING,
    ServeProcess,
    create_request,
    error_info,
    health_stub,
    independent_totp,
    rpc_error,
    stored_users,
    users_grpc,
    wait_until,
)
from tests.support.mail import MailSink, SocketController
from tests.support.paths import HARNESS
from tests.support.servers import BearerToken, StartServer
from tests.support.sockets import bound_socket, port_of
from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc
from users_grpc.ops.devdb import DevDatabase, start_dev_database

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
WRONG = "not the password at all"


class Replica:
    """``users-grpc serve`` as a process of its own, and an anonymous stub to it."""

    def __init__(self, mongodb_uri: str, database: str, smtp_port: int, **env: str) -> None:
        self.process = ServeProcess(
            USERS_MONGODB_URI=mongodb_uri,
            USERS_MONGODB_DATABASE=database,
            USERS_SMTP_HOST="127.0.0.1",
            USERS_SMTP_PORT=str(smtp_port),
            USERS_SMTP_SECURITY="none",
            USERS_MAIL_POLL_SECONDS="0.2",
            USERS_HEALTH_INTERVAL_SECONDS="0.2",
            USERS_BCRYPT_ROUNDS="10",
            USERS_RATE_LIMIT_REQUESTS="1000000",
            **env,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.process.port()}")
        self.anonymous = user_service_pb2_grpc.UserServiceStub(self.channel)
        health = health_stub(self.channel)
        wait_until(
            lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status == SERVING,
            what="a serving replica",
        )

    def stub_for(self, access_token: str) -> user_service_pb2_grpc.UserServiceStub:
        return user_service_pb2_grpc.UserServiceStub(grpc.intercept_channel(self.channel, BearerToken(access_token)))

    def sign_in(self, identifier: str, password: str = PASSWORD, **factors: str) -> Any:
        return self.anonymous.Authenticate(pb.AuthenticateRequest(identifier=identifier, password=password, **factors))

    def sign_in_error(self, identifier: str, password: str = PASSWORD, **factors: str) -> grpc.RpcError:
        request = pb.AuthenticateRequest(identifier=identifier, password=password, **factors)
        return rpc_error(self.anonymous.Authenticate, request)

    def close(self) -> None:
        self.channel.close()
        self.process.close()
        assert not any("Traceback" in line for line in self.process.lines), "".join(self.process.lines)


@pytest.fixture
def replicas(
    mongodb_uri: str, database_name: str, smtp_server: tuple[MailSink, int], mail: MailSink
) -> Iterator[tuple[Replica, Replica]]:
    started: list[Replica] = []
    try:
        for _ in range(2):
            # Reload keys often, so a retired key stops verifying on both within the test.
            started.append(Replica(mongodb_uri, database_name, smtp_server[1], USERS_KEY_RELOAD_SECONDS="1"))
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.close()


def outbox_size(mongodb_uri: str, database: str) -> int:
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        return client[database].outbox.count_documents({})


def delivered_exactly_once(sink: MailSink, recipients: list[str], mongodb_uri: str, database: str) -> None:
    """Every recipient got its mail, and none can get a second: a mail leaves the outbox only
    once delivered, so with the outbox empty no copy is still on its way."""
    for to in recipients:
        sink.wait_for(to)
    wait_until(lambda: outbox_size(mongodb_uri, database) == 0, what="an empty outbox")
    received = sorted(m["To"] for m in sink.messages if m["To"] in recipients)
    assert received == sorted(recipients)


def activated(replica: Replica, mail: MailSink, name: str) -> None:
    email = f"{name}@example.com"
    replica.anonymous.CreateUser(create_request(username=name, email=email))
    replica.anonymous.ActivateUser(pb.ActivateUserRequest(identifier=name, code=mail.code_for(email)))


def test_two_server_processes_on_one_database_act_as_one(
    replicas: tuple[Replica, Replica], mail: MailSink, mongodb_uri: str, database_name: str
) -> None:
    a, b = replicas
    # The outbox: registrations on both, each mail delivered exactly once by one of them.
    recipients = [f"user{n}@example.com" for n in range(8)]
    for n, to in enumerate(recipients):
        (a, b)[n % 2].anonymous.CreateUser(create_request(username=f"user{n}", email=to))
    delivered_exactly_once(mail, recipients, mongodb_uri, database_name)

    # The password throttle: the free tries spent at one replica are spent at the other.
    activated(a, mail, "jane")
    for _ in range(5):  # USERS_PASSWORD_FREE_ATTEMPTS
        assert a.sign_in_error("jane", WRONG).code() == UNAUTHENTICATED
    held = b.sign_in_error("jane")
    assert held.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(held).reason == "TOO_MANY_ATTEMPTS"

    # A rotated refresh token: replayed at the other replica, it is refused and ends the session.
    activated(b, mail, "bob")
    first = a.sign_in("bob")
    second = a.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=first.refresh_token))
    replay = rpc_error(b.anonymous.RefreshSession, pb.RefreshSessionRequest(refresh_token=first.refresh_token))
    assert replay.code() == UNAUTHENTICATED
    ended = rpc_error(b.anonymous.RefreshSession, pb.RefreshSessionRequest(refresh_token=second.refresh_token))
    assert ended.code() == UNAUTHENTICATED

    # An accepted TOTP step: used at one replica, refused at the other.
    activated(a, mail, "carol")
    carol = a.sign_in("carol")
    own = a.stub_for(carol.access_token)
    secret = own.EnableMfa(pb.EnableMfaRequest(user_id=carol.user.id, password=PASSWORD)).secret

    # Confirm with the previous step's code and sign in with the current one: no wait for a new
    # step, provided the step does not turn meanwhile (and the two codes differ, as all but once in
    # a million they do: the same code would be taken as the current step's).
    def early_in_a_step_of_two_codes() -> bool:
        now = time.time()
        return now % 30 < 20 and independent_totp(secret, now, -1) != independent_totp(secret, now)

    wait_until(
        early_in_a_step_of_two_codes,
        timeout=61,
        what="the first 20 s of a TOTP step",
    )
    now = time.time()
    b.stub_for(carol.access_token).ConfirmMfa(
        pb.ConfirmMfaRequest(user_id=carol.user.id, code=independent_totp(secret, now, -1))
    )
    code = independent_totp(secret, now)
    assert b.sign_in("carol", totp_code=code).user.id == carol.user.id
    assert a.sign_in_error("carol", totp_code=code).code() == UNAUTHENTICATED

    # A signing-key rotation: both replicas sign with the new key and verify each other's tokens;
    # once the old key is retired, neither accepts what it signed.
    old_token = a.sign_in("bob").access_token
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    settings = type("Settings", (), {"mongodb_uri": mongodb_uri, "mongodb_database": database_name})()
    rotated = users_grpc("keys", "rotate", server_settings=settings)
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.strip()
    for replica in (a, b):
        wait_until(
            lambda r=replica: jwt.get_unverified_header(r.sign_in("bob").access_token)["kid"] == new_kid,  # type: ignore[misc]
            what="the new signing key",
        )
    bob_id = first.user.id
    new_token = a.sign_in("bob").access_token
    assert b.stub_for(new_token).GetUser(pb.GetUserRequest(id=bob_id)).user.username == "bob"
    retired = users_grpc("keys", "retire", old_kid, server_settings=settings)
    assert retired.returncode == 0, retired.stderr
    for replica in (a, b):

        def refuses_old_token(r: Replica = replica) -> bool:
            try:
                r.stub_for(old_token).GetUser(pb.GetUserRequest(id=bob_id))
            except grpc.RpcError as error:
                return error.code() == UNAUTHENTICATED
            return False

        wait_until(refuses_old_token, what="the retired key refused")

    # Mail of all of the above (activations, the MFA notice) went out exactly once too.
    wait_until(lambda: outbox_size(mongodb_uri, database_name) == 0, what="an empty outbox")
    ids = [m["Message-ID"] for m in mail.messages]
    assert len(ids) == len(set(ids))


class Load:
    """CreateUser and GetUser in a loop on a few threads; each outcome with how long it took."""

    def __init__(self, stub: user_service_pb2_grpc.UserServiceStub, user_id: str, deadline: float) -> None:
        self.stub, self.user_id, self.deadline = stub, user_id, deadline
        self.outcomes: list[tuple[str, grpc.StatusCode, float, str]] = []
        self.created: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(4)]
        for thread in self._threads:
            thread.start()

    def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            name = f"load{worker}x{n}"
            call: Any
            if worker % 2:
                method, call = "CreateUser", self.stub.CreateUser
                request: Any = create_request(username=name, email=f"{name}@example.com")
            else:
                method, call, request = "GetUser", self.stub.GetUser, pb.GetUserRequest(id=self.user_id)
            started = time.monotonic()
            try:
                call(request, timeout=self.deadline)
                code = OK
            except grpc.RpcError as error:
                code = error.code()
            with self._lock:
                self.outcomes.append((method, code, time.monotonic() - started, name))
                if code == OK and worker % 2:
                    self.created.append(name)

    def codes_since(self, index: int) -> list[grpc.StatusCode]:
        with self._lock:
            return [code for _, code, _, _ in self.outcomes[index:]]

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.fixture
def killable_database(tmp_path: Path) -> Iterator[list[DevDatabase]]:
    """A FerretDB process of the test's own, on a data directory and a port (bound at 0, read back)
    of its own, to kill and start again on both."""
    databases = [start_dev_database(data_dir=tmp_path / "db", binary=HARNESS)]
    yield databases
    for database in databases:
        database.stop()


def test_the_database_killed_under_load(
    killable_database: list[DevDatabase], start_server: StartServer, tmp_path: Path
) -> None:
    """Calls fail within their deadline as UNAVAILABLE, readiness follows the database and liveness
    does not, no user is half-written, and the same server serves again once the database is back."""
    database = killable_database[0]
    server = start_server(mongodb_uri=database.uri, db_timeout_seconds=1.0, hash_queue_length=64)
    health = health_stub(server.channel)

    def status(name: str) -> int:
        check: int = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        return check

    deadline = 4.0
    load = Load(server.stub, server.admin_id, deadline)
    try:
        wait_until(lambda: load.codes_since(0).count(OK) >= 10, what="calls succeeding")
        database.process.kill()
        database.process.wait()
        killed_at = load.count()
        wait_until(lambda: status(SERVICE) == NOT_SERVING, what="readiness NOT_SERVING")
        assert status("liveness") == SERVING
        wait_until(lambda: load.codes_since(killed_at).count(UNAVAILABLE) >= 8, what="calls failing")

        # The same data directory and port, as a restarted database pod would have.
        listen = database.uri.removeprefix("mongodb://").split("/")[0]
        killable_database.append(start_dev_database(data_dir=tmp_path / "db", binary=HARNESS, listen=listen))
        wait_until(lambda: status(SERVICE) == SERVING, timeout=30, what="readiness SERVING again")
        back_at = load.count()
        wait_until(lambda: load.codes_since(back_at).count(OK) >= 10, timeout=30, what="calls succeeding again")
    finally:
        load.stop()
    assert status("liveness") == SERVING

    codes = {code for _, code, _, _ in load.outcomes}
    assert codes <= {OK, UNAVAILABLE}, codes  # never INTERNAL, UNKNOWN or DEADLINE_EXCEEDED
    slowest = max(elapsed for _, code, elapsed, _ in load.outcomes if code != OK)
    assert slowest < deadline
    # No user half-written: each stored one is whole, and every one whose CreateUser succeeded is stored.
    stored = {u["username"]: u for u in stored_users(database.uri, server.settings.mongodb_database)}
    assert set(load.created) <= stored.keys()
    for name, user in stored.items():
        assert user["password_hash"].startswith("$2b$"), name
        assert {"username_key", "email_key", "created_at"} <= user.keys(), name


def test_smtp_down_while_users_register(start_server: StartServer, mongodb_uri: str) -> None:
    """Registrations succeed while SMTP is down; once it is back, every mail arrives exactly once."""
    dead = bound_socket()  # refuses connections until the SMTP server below listens on it
    server = start_server(smtp_port=port_of(dead), mail_retry_seconds=0.1, smtp_timeout_seconds=0.5)
    recipients = [f"user{n}@example.com" for n in range(8)]
    futures = [
        server.anonymous.CreateUser.future(create_request(username=f"user{n}", email=to), timeout=30)
        for n, to in enumerate(recipients)
    ]
    assert all(f.result().user.username for f in futures)
    assert outbox_size(mongodb_uri, server.settings.mongodb_database) == len(recipients)

    sink = MailSink()
    controller = SocketController(sink, dead)
    controller.start()
    try:
        delivered_exactly_once(sink, recipients, mongodb_uri, server.settings.mongodb_database)
        assert len(sink.messages) == len(recipients)
    finally:
        controller.stop()


def test_sigterm_under_load(mongodb_uri: str, database_name: str, tmp_path: Path) -> None:
    """Every call that had started completes; calls after the shutdown delay are refused; the
    process exits within the shutdown delay plus grace."""
    delay, grace = 0.5, 20.0
    serve = ServeProcess(
        USERS_MONGODB_URI=mongodb_uri,
        USERS_MONGODB_DATABASE=database_name,
        USERS_MAIL_DIR=str(tmp_path / "mail"),
        # One hashing thread at a slow cost: the registrations queue, in flight, for seconds.
        USERS_BCRYPT_ROUNDS="12",
        USERS_HASH_WORKERS="1",
        USERS_HASH_QUEUE_LENGTH="64",
        USERS_RATE_LIMIT_REQUESTS="1000000",
        USERS_SHUTDOWN_DELAY_SECONDS=str(delay),
        USERS_SHUTDOWN_GRACE_SECONDS=str(grace),
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serve.port()}") as channel:
            health = health_stub(channel)
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == SERVING)
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            in_flight = [
                stub.CreateUser.future(create_request(username=f"user{n}", email=f"user{n}@example.com"), timeout=60)
                for n in range(6)
            ]
            # The first stored user shows the calls reached the server (they were all sent before).
            wait_until(lambda: bool(stored_users(mongodb_uri, database_name)), what="a first registration")
            signalled = time.monotonic()
            serve.process.terminate()

            refusals: list[grpc.StatusCode] = []

            def refused() -> bool:
                try:
                    stub.GetPublicKeys(pb.GetPublicKeysRequest(), timeout=2)
                except grpc.RpcError as error:
                    refusals.append(error.code())
                    return True
                return False

            wait_until(refused, timeout=delay + grace, what="a new call refused")
            assert refusals == [UNAVAILABLE]
            assert sorted(f.result().user.username for f in in_flight) == [f"user{n}" for n in range(6)]
        assert serve.process.wait(timeout=delay + grace + 5) == 0
        assert time.monotonic() - signalled < delay + grace
    finally:
        serve.close()
    assert not any("Traceback" in line for line in serve.lines)
    assert len(stored_users(mongodb_uri, database_name)) == 6
