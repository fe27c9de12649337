"""WatchUserChanges over the HTTP edge, by the generated connectrpc client over Connect (its
end-stream message) and gRPC-Web (its trailers frame): the same stream as over gRPC, through the
same guard. A change made over gRPC arrives; a revoked caller's stream ends at its next poll,
delivering nothing more; one cap of streams counts both edges."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator

import grpc
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2

from tests.support.calls import (
    create_request,
    create_service_account,
    issue_service_token,
    new_admin,
    rpc_error,
    wait_until,
)
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users.v1.user_service_connect import UserServiceClientSync

T = pb.UserChangeType
PROTOCOLS = (ProtocolType.CONNECT, ProtocolType.GRPC_WEB)
Stream = Generator[pb.WatchUserChangesResponse, None, None]


def http_stream(server: RunningServer, token: str, protocol: ProtocolType) -> Stream:
    """A WatchUserChanges stream over the HTTP edge, as ``token``'s holder; closing it closes the connection."""
    with UserServiceClientSync(f"http://127.0.0.1:{server.app.http_port}", protocol=protocol) as client:
        yield from client.watch_user_changes(
            pb.WatchUserChangesRequest(), headers={"authorization": f"Bearer {token}"}, timeout_ms=30_000
        )


def read_until_created(stream: Iterator[pb.WatchUserChangesResponse], user_id: str) -> None:
    for response in stream:
        if response.change.user_id == user_id and response.change.type == T.USER_CHANGE_TYPE_CREATED:
            return
    raise AssertionError("the stream ended before the user's creation arrived")


def end_of(stream: Iterator[pb.WatchUserChangesResponse]) -> ConnectError:
    """The error a stream ends with; fails if it delivers a change first."""
    try:
        for response in stream:
            raise AssertionError(f"delivered after the caller lost access: {response.change}")
    except ConnectError as error:
        return error
    raise AssertionError("the stream ended without an error")


def reason_of(error: ConnectError) -> str:
    for detail in error.details:
        if detail.type_name == "google.rpc.ErrorInfo":
            return str(error_details_pb2.ErrorInfo.FromString(detail.message_bytes).reason)
    return ""


@pytest.fixture
def http_server(start_server: StartServer) -> RunningServer:
    return start_server(http_address="127.0.0.1:0")


def test_a_change_made_over_grpc_arrives_on_the_http_stream(http_server: RunningServer) -> None:
    server = http_server
    for protocol in PROTOCOLS:
        with contextlib.closing(http_stream(server, server.admin_token, protocol)) as stream:
            assert next(stream).change.user_id == server.admin_id  # admitted: the admin's creation came
            name = f"watched-{protocol.name.lower().replace('_', '-')}"
            created = server.stub.CreateUser(create_request(username=name, email=f"{name}@example.com")).user
            read_until_created(stream, created.id)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda protocol: protocol.name)
def test_a_demoted_admins_http_stream_ends_before_the_next_change(
    http_server: RunningServer, mail: MailSink, protocol: ProtocolType
) -> None:
    """As over gRPC (test_change_feed): the stream's admission runs again at every poll. The demotion
    stores the role before the token version moves, so the end is PERMISSION_DENIED or, once the
    token is stale, UNAUTHENTICATED; either way no change made after the demotion is delivered."""
    server = http_server
    bea = new_admin(server, mail)
    with contextlib.closing(http_stream(server, bea.access_token, protocol)) as stream:
        alice = server.stub.CreateUser(create_request(username="alice", email="alice@example.com")).user
        read_until_created(stream, alice.id)
        server.stub.SetUserRole(pb.SetUserRoleRequest(user_id=bea.user.id, role=user_pb2.ROLE_USER))
        mask = FieldMask(paths=["first_name"])
        server.stub.UpdateUser(
            pb.UpdateUserRequest(user_id=alice.id, user=user_pb2.User(first_name="Alicia"), update_mask=mask)
        )
        ended = end_of(stream)
    assert ended.code in {Code.PERMISSION_DENIED, Code.UNAUTHENTICATED}, ended


def test_an_idle_http_stream_ends_at_its_next_poll_once_its_service_account_is_deleted(
    start_server: StartServer,
) -> None:
    """No change has to come: the idle stream is admitted again at each poll, as over gRPC, and
    ends UNAUTHENTICATED in gRPC-Web's trailers. (Deleting a service account changes no user, so
    nothing wakes the stream before its poll.)"""
    server = start_server(http_address="127.0.0.1:0", change_poll_seconds=0.1)
    created = create_service_account(server, "billing")
    client_id = created.service_account.client_id
    token = issue_service_token(server, client_id, created.client_secret).access_token
    with contextlib.closing(http_stream(server, token, ProtocolType.GRPC_WEB)) as stream:
        assert next(stream).change.user_id == server.admin_id  # open and being served
        server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=client_id))
        ended = end_of(stream)
    assert (ended.code, reason_of(ended)) == (Code.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_one_cap_of_streams_counts_both_edges(start_server: StartServer) -> None:
    """USERS_MAX_STREAMS_PER_CALLER=1: the admin's gRPC stream takes its share from its HTTP streams and
    the other way round, and a stream closed by its HTTP client gives its place back."""
    server = start_server(http_address="127.0.0.1:0", max_streams_per_caller=1)

    def grpc_admitted() -> bool:
        stream = server.stub.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=10)
        try:
            return bool(next(stream).change.user_id == server.admin_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return False
        finally:
            stream.cancel()

    held = server.stub.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)
    try:
        assert next(held).change.user_id == server.admin_id
        for protocol in PROTOCOLS:
            with contextlib.closing(http_stream(server, server.admin_token, protocol)) as refused:
                error = end_of(refused)
            assert (error.code, reason_of(error)) == (Code.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
    finally:
        held.cancel()
    wait_until(grpc_admitted, what="the gRPC stream's place given back")

    with contextlib.closing(http_stream(server, server.admin_token, ProtocolType.CONNECT)) as over_http:
        assert next(over_http).change.user_id == server.admin_id
        refused_grpc = rpc_error(
            lambda r: list(server.stub.WatchUserChanges(r, timeout=10)), pb.WatchUserChangesRequest()
        )
        assert refused_grpc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_until(grpc_admitted, what="the HTTP stream's place given back once its client closed it")
