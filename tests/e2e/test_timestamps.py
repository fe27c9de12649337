"""A time the server returns is the time it stores: cut to MongoDB's milliseconds before the first
write, so no later read (or refresh) shows a different value than the first answer did."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from tests.support.calls import PASSWORD, create_request
from tests.support.mail import MailSink
from tests.support.servers import RunningServer
from users.v1 import user_service_pb2 as pb


def whole_milliseconds(*times: Timestamp) -> bool:
    return all(time.nanos % 1_000_000 == 0 for time in times)


def test_a_users_times_are_the_same_when_read_again(server: RunningServer, mail: MailSink) -> None:
    created = server.anonymous.CreateUser(create_request()).user
    assert server.stub.GetUser(pb.GetUserRequest(id=created.id)).user.created_at == created.created_at
    activated = server.anonymous.ActivateUser(
        pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com"))
    ).user
    read = server.stub.GetUser(pb.GetUserRequest(id=created.id)).user
    assert (read.created_at, read.updated_at) == (created.created_at, activated.updated_at)
    assert whole_milliseconds(created.created_at, created.updated_at, activated.updated_at)


def test_a_sessions_expiry_is_the_same_in_every_answer(server: RunningServer, mail: MailSink) -> None:
    server.anonymous.CreateUser(create_request())
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com")))
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    own = server.stub_for(signed_in.access_token)
    [listed] = own.ListSessions(pb.ListSessionsRequest(user_id=signed_in.user.id)).sessions
    assert listed.expires_at == signed_in.refresh_token_expires_at
    claims = server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=signed_in.access_token)).claims
    assert claims.expires_at == signed_in.access_token_expires_at
    # The access token's expiry is its JWT's exp, whole seconds; the session's is stored.
    assert signed_in.access_token_expires_at.nanos == 0
    assert whole_milliseconds(signed_in.refresh_token_expires_at, listed.created_at, listed.last_used_at)

    refreshed = server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=signed_in.refresh_token))
    assert refreshed.refresh_token_expires_at == signed_in.refresh_token_expires_at
    [after] = (
        server.stub_for(refreshed.access_token).ListSessions(pb.ListSessionsRequest(user_id=signed_in.user.id)).sessions
    )
    assert (after.expires_at, after.created_at) == (listed.expires_at, listed.created_at)
