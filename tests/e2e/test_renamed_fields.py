"""The released fields renamed to the contract's convention (docs/contract.md, "How existing names
move"), through a real server: every reply fills the deprecated name and the one that replaced it
with the same value; a request takes either name, and refuses both when they differ."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.test_audit import audit_events
from tests.e2e.test_passkeys import Person, register, sign_in
from tests.support.authenticator import SoftwareAuthenticator
from tests.support.calls import PASSWORD, rpc_error, signed_up
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, make_settings
from users.v1 import user_service_pb2 as pb


@dataclass
class World:
    server: RunningServer
    mail: MailSink
    jane: pb.AuthenticateResponse
    bob: pb.AuthenticateResponse
    replies: dict[str, Message]


@pytest.fixture(scope="module")
def world(mongodb_uri: str, smtp_server: tuple[MailSink, int]) -> Iterator[World]:
    sink, port = smtp_server
    sink.clear()
    server = RunningServer(make_settings(mongodb_uri, f"test_{uuid.uuid4().hex[:16]}", port), clock=None)
    try:
        jane, bob = signed_up(server, sink, "jane"), signed_up(server, sink, "bob")
        own = server.stub_for(jane.access_token)
        register(Person(server, jane, authenticator := SoftwareAuthenticator("ES256")))
        refreshed = server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=bob.refresh_token))
        replies: dict[str, Message] = {
            "User": own.GetUser(pb.GetUserRequest(id=jane.user.id)).user,
            "Session": own.ListSessions(pb.ListSessionsRequest(user_id=jane.user.id)).sessions[0],
            "TokenClaims": server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=jane.access_token)).claims,
            "AuthenticateResponse": jane,
            "RefreshSessionResponse": refreshed,
            "FinishPasskeySignInResponse": sign_in(server, authenticator),
        }
        yield World(server, sink, jane, bob, replies)
    finally:
        server.stop()


# Every released field deprecated for a new name: (the reply it is in, old name, new name).
RENAMED_REPLY_FIELDS = [
    ("User", "created_at", "create_time"),
    ("User", "updated_at", "update_time"),
    ("Session", "created_at", "create_time"),
    ("Session", "last_used_at", "last_use_time"),
    ("Session", "expires_at", "expire_time"),
    ("TokenClaims", "issued_at", "issue_time"),
    ("TokenClaims", "expires_at", "expire_time"),
    ("AuthenticateResponse", "access_token_expires_at", "access_token_expire_time"),
    ("AuthenticateResponse", "refresh_token_expires_at", "refresh_token_expire_time"),
    ("RefreshSessionResponse", "access_token_expires_at", "access_token_expire_time"),
    ("RefreshSessionResponse", "refresh_token_expires_at", "refresh_token_expire_time"),
    # Not released, but the same fields as AuthenticateResponse's, so that one client code reads both.
    ("FinishPasskeySignInResponse", "access_token_expires_at", "access_token_expire_time"),
    ("FinishPasskeySignInResponse", "refresh_token_expires_at", "refresh_token_expire_time"),
]


@pytest.mark.parametrize(("reply", "old", "new"), RENAMED_REPLY_FIELDS)
def test_a_reply_fills_the_old_name_and_the_new_with_one_value(world: World, reply: str, old: str, new: str) -> None:
    message = world.replies[reply]
    assert message.HasField(old)
    assert message.HasField(new)
    assert getattr(message, old) == getattr(message, new)


# The calls below are made with the caller's own token, under the "the user themself" rule: the access
# rule has to find the user in the same field the call then acts on. "self" in ``names`` is the caller's id.


def get_user(world: World, names: dict[str, str]) -> pb.AuthenticateResponse:
    """GetUser of jane by jane, the user named by ``names``; the caller."""
    ids = {field: world.jane.user.id if value == "self" else value for field, value in names.items()}
    user = world.server.stub_for(world.jane.access_token).GetUser(pb.GetUserRequest(**ids)).user
    assert user.id == world.jane.user.id
    return world.jane


def delete_user(world: World, names: dict[str, str]) -> pb.AuthenticateResponse:
    """DeleteUser by a new user of their own account, named by ``names``; the caller."""
    carol = signed_up(world.server, world.mail, f"carol{uuid.uuid4().hex[:8]}")
    ids = {field: carol.user.id if value == "self" else value for field, value in names.items()}
    world.server.stub_for(carol.access_token).DeleteUser(pb.DeleteUserRequest(password=PASSWORD, **ids))
    gone = rpc_error(world.server.stub.GetUser, pb.GetUserRequest(user_id=carol.user.id))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    [deleted] = audit_events(world.server.stub, subject_id=carol.user.id, types=[pb.AUDIT_EVENT_TYPE_USER_DELETE])
    assert deleted.status_code == grpc.StatusCode.OK.value[0]
    return carol


# Each request with a deprecated id field, called naming the caller by the given fields.
RENAMED_REQUESTS: dict[str, Callable[[World, dict[str, str]], pb.AuthenticateResponse]] = {
    "GetUser": get_user,
    "DeleteUser": delete_user,
}


@pytest.mark.parametrize("method", RENAMED_REQUESTS)
@pytest.mark.parametrize("names", [{"user_id": "self"}, {"id": "self"}, {"id": "self", "user_id": "self"}])
def test_a_request_names_the_user_by_either_field(world: World, method: str, names: dict[str, str]) -> None:
    RENAMED_REQUESTS[method](world, names)  # each checks the call acted on the caller's account


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
    return violations


@pytest.mark.parametrize("method", RENAMED_REQUESTS)
def test_both_fields_naming_different_users_is_invalid_argument(world: World, method: str) -> None:
    # The caller's own id in one field, someone else's in the other: neither may be read alone.
    with pytest.raises(grpc.RpcError) as refused:
        RENAMED_REQUESTS[method](world, {"id": "self", "user_id": world.bob.user.id})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    [(field, description)] = field_violations(refused.value)
    assert field == "id"
    assert "user_id" in description
    assert world.server.stub.GetUser(pb.GetUserRequest(user_id=world.bob.user.id)).user.id == world.bob.user.id
