"""Small helpers for calling the server through a real channel."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.database import Database

from tests.support.fakes import FakeClock
from tests.support.mail import MailSink, text_of
from tests.support.paths import REPO_ROOT
from tests.support.servers import KEY_ENCRYPTION_KEY, RunningServer
from users.v1 import user_pb2, user_service_pb2

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new passphrase"
SERVICE = "users.v1.UserService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def lines_holding(secret: str, text: str) -> list[str]:
    """The lines of ``text`` that hold ``secret``.

    A numeric code counts only standing alone: six digits turn up by chance inside a float the
    driver logs (``"durationMS": 0.128692...``) or a hex id, and such a match is no leak.
    """
    assert secret, "an empty secret proves nothing"
    pattern = re.escape(secret)
    if secret.isdigit():
        pattern = rf"(?<![0-9A-Za-z]){pattern}(?![0-9A-Za-z])"
    return [line for line in text.splitlines() if re.search(pattern, line)]


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Wait for something that happens in the background, and fail, never hang, if it does not."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def signed_up(server: RunningServer, mail: MailSink, name: str = "jane") -> user_service_pb2.AuthenticateResponse:
    """Register and activate a user, then sign in."""
    email = f"{name}@example.com"
    server.anonymous.CreateUser(create_request(username=name, email=email))
    code = mail.code_for(email)
    server.anonymous.ActivateUser(user_service_pb2.ActivateUserRequest(identifier=name, code=code))
    return server.anonymous.Authenticate(user_service_pb2.AuthenticateRequest(identifier=name, password=PASSWORD))


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


def _detail(error: grpc.RpcError, kind: Any) -> Any:
    """The error's rich-status detail of message type ``kind``."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.DESCRIPTOR.name} detail")


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    return _detail(error, error_details_pb2.ErrorInfo)


def health_stub(channel: grpc.Channel) -> Any:
    # Typed as Any: the grpcio-health-checking stubs declare no methods on HealthStub.
    return health_pb2_grpc.HealthStub(channel)


def stored_users(mongodb_uri: str, database: str, **query: Any) -> list[dict[str, Any]]:
    """The user documents as stored, read with a client of the test's own."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        return list(client[database].users.find(query))


@contextlib.contextmanager
def raw_collection(mongodb_uri: str, database: str, name: str) -> Iterator[Collection[dict[str, Any]]]:
    """A collection as stored, through a client of the test's own, closed afterwards."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        yield client[database][name]


def wait_until_mail_settled(database: Database[Any], timeout: float = 60.0) -> None:
    """Wait until no mail is left to send: none waits in the outbox (a delivered mail is deleted
    from it) and no security notice waits in a user's document. From then on no copy of any mail
    can still arrive, so a test may count what arrived; no fixed sleep has to outlast a lease."""
    wait_until(
        lambda: (
            database.outbox.count_documents({"status": {"$in": ["pending", "sending"]}}) == 0
            and database.users.count_documents({"pending_mail_since": {"$exists": True}}) == 0
        ),
        timeout=timeout,
        what="the outbox and every pending notice to drain",
    )


class SourceAddressRelay:
    """A TCP relay whose connections reach the server from another loopback address.

    gRPC clients cannot pick their local address; connecting through this relay, a test
    calls the server as, say, 127.0.0.2 while other calls come from 127.0.0.1.
    """

    def __init__(self, target: str, source_host: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._source_host = source_host
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target, source_address=(self._source_host, 0))
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def retry_delay(error: grpc.RpcError) -> float:
    """The seconds of the error's google.rpc.RetryInfo detail."""
    return float(_detail(error, error_details_pb2.RetryInfo).retry_delay.ToTimedelta().total_seconds())


def refresh(server: RunningServer, token: str) -> user_service_pb2.RefreshSessionResponse:
    return server.anonymous.RefreshSession(user_service_pb2.RefreshSessionRequest(refresh_token=token))


def refresh_status(server: RunningServer, token: str) -> grpc.StatusCode:
    """The status of RefreshSession with this token, which must fail."""
    request = user_service_pb2.RefreshSessionRequest(refresh_token=token)
    code: grpc.StatusCode = rpc_error(server.anonymous.RefreshSession, request).code()
    return code


def get_user_status(server: RunningServer, token: str, user_id: str) -> grpc.StatusCode:
    """The status of GetUser(user_id) called with this access token, which must fail."""
    code: grpc.StatusCode = rpc_error(
        server.stub_for(token).GetUser, user_service_pb2.GetUserRequest(id=user_id)
    ).code()
    return code


def new_admin(server: RunningServer, mail: MailSink, name: str = "bea") -> user_service_pb2.AuthenticateResponse:
    """A second admin, made by the server's admin, activated and signed in."""
    email = f"{name}@example.com"
    server.stub.CreateUser(create_request(username=name, email=email, role=user_pb2.ROLE_ADMIN))
    server.anonymous.ActivateUser(user_service_pb2.ActivateUserRequest(identifier=name, code=mail.code_for(email)))
    return server.anonymous.Authenticate(user_service_pb2.AuthenticateRequest(identifier=name, password=PASSWORD))


def reset_token(mail: MailSink, to: str, nth: int = 1) -> str:
    """The token of the nth reset mail to ``to``, waiting for it."""
    wait_until(lambda: len(reset_mails(mail, to)) >= nth, what=f"reset mail {nth}")
    body = reset_mails(mail, to)[nth - 1]
    match = re.search(r"new password:\s+(\S+)", body)
    assert match, body
    return match.group(1)


def reset_mails(mail: MailSink, to: str) -> list[str]:
    return [text_of(m) for m in mail.messages if m["To"] == to and m["Subject"] == "Reset your password"]


def reset(server: RunningServer, token: str, password: str = NEW_PASSWORD) -> user_service_pb2.ResetPasswordResponse:
    return server.anonymous.ResetPassword(
        user_service_pb2.ResetPasswordRequest(token=token, new_password=password, new_password_confirmation=password)
    )


def independent_totp(secret: str, unix_time: float, step_offset: int = 0) -> str:
    """RFC 6238 / RFC 4226 written out here, independent of the service's pyotp."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    counter = int(unix_time) // 30 + step_offset
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{value % 1_000_000:06d}"


class Enrolled:
    """A signed-in user with MFA on, on a server whose clock the test moves."""

    def __init__(self, server: RunningServer, mail: MailSink, clock: FakeClock) -> None:
        self.server, self.clock = server, clock
        session = signed_up(server, mail)
        self.user_id = session.user.id
        own = server.stub_for(session.access_token)
        enrollment = own.EnableMfa(user_service_pb2.EnableMfaRequest(user_id=self.user_id, password=PASSWORD))
        self.secret = enrollment.secret
        self.enrollment = enrollment
        self.recovery_codes = list(
            own.ConfirmMfa(user_service_pb2.ConfirmMfaRequest(user_id=self.user_id, code=self.code())).recovery_codes
        )
        self.clock.advance(seconds=30)  # the confirming code's step is used up

    def code(self, step_offset: int = 0) -> str:
        return independent_totp(self.secret, self.clock.now().timestamp(), step_offset)

    def sign_in(self, **factors: str) -> Any:
        return self.server.anonymous.Authenticate(
            user_service_pb2.AuthenticateRequest(identifier="jane", password=PASSWORD, **factors)
        )

    def sign_in_error(self, password: str = PASSWORD, **factors: str) -> grpc.RpcError:
        request = user_service_pb2.AuthenticateRequest(identifier="jane", password=password, **factors)
        return rpc_error(self.server.anonymous.Authenticate, request)


def users_grpc(*args: str, server_settings: object, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``users-grpc`` command as a process, on the database of a server's settings."""
    settings = server_settings
    environment = {
        **os.environ,
        "USERS_MONGODB_URI": settings.mongodb_uri,  # type: ignore[attr-defined]
        "USERS_MONGODB_DATABASE": settings.mongodb_database,  # type: ignore[attr-defined]
        "USERS_KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(KEY_ENCRYPTION_KEY).decode(),
        "USERS_BCRYPT_ROUNDS": "10",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "users_grpc", *args],
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class ServeProcess:
    """``users-grpc serve`` as a process on port 0 (one worker unless ``USERS_WORKERS`` is given), its
    JSON log lines collected as they come."""

    def __init__(self, **env: str) -> None:
        environment = {
            **os.environ,
            "USERS_GRPC_ADDRESS": "127.0.0.1:0",
            "USERS_KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(KEY_ENCRYPTION_KEY).decode(),
            # One process unless a test asks for workers: each costs a start on the suite's two cores.
            "USERS_WORKERS": "1",
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "users_grpc", "serve"],
            env=environment,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def logged(self, message: str) -> list[dict[str, Any]]:
        records = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("message") == message:
                    records.append(record)
        return records

    def port(self) -> int:
        wait_until(lambda: bool(self.logged("listening")), what="the listening line")
        return int(self.logged("listening")[0]["port"])

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self._reader.join(5)
        assert self.process.stderr is not None
        self.process.stderr.close()


def create_service_account(
    server: RunningServer, name: str, permissions: Sequence[user_service_pb2.ServiceAccountPermission.ValueType] = ()
) -> user_service_pb2.CreateServiceAccountResponse:
    """An admin's CreateServiceAccount: the account and its one-time secret."""
    request = user_service_pb2.CreateServiceAccountRequest(name=name, permissions=permissions)
    return server.stub.CreateServiceAccount(request)


def issue_service_token(
    server: RunningServer, client_id: str, secret: str
) -> user_service_pb2.IssueServiceTokenResponse:
    """IssueServiceToken, as the service that holds the secret calls it (anonymously)."""
    request = user_service_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret)
    return server.anonymous.IssueServiceToken(request)
