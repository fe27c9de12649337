"""Small helpers for calling the server through a real channel."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.database import Database

from tests.conftest import MailSink, RunningServer
from users.v1 import user_pb2, user_service_pb2

PASSWORD = "correct horse battery"


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
