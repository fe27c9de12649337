"""What an authenticated call costs: one read of the caller's document, and one signature check
per access token per process (issue 10)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import jwt
import pytest

from tests.support.calls import rpc_error, signed_up
from tests.support.commands import CommandRecorder
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import StartServer
from users.v1 import user_service_pb2 as pb

# Background work far apart, so that only the calls themselves talk to the database.
QUIET = {
    "health_interval_seconds": 300.0,
    "mail_poll_seconds": 300.0,
    "housekeeping_interval_seconds": 3600.0,
    "key_reload_seconds": 3600.0,
}


def test_get_user_with_ones_own_token_reads_the_database_once(start_server: StartServer, mail: MailSink) -> None:
    recorder = CommandRecorder()
    server = start_server(event_listeners=[recorder], **QUIET)
    jane = signed_up(server, mail)
    stub = server.stub_for(jane.access_token)
    stub.GetUser(pb.GetUserRequest(id=jane.user.id))  # the token's first use checks its signature too

    recorder.clear()
    reply = stub.GetUser(pb.GetUserRequest(id=jane.user.id))

    sent = [(c.name, c.document.get(c.name)) for c in recorder.commands if c.in_call]
    assert sent == [("find", "users")]
    assert reply.user.username == "jane"


def test_get_user_of_someone_else_reads_them_too(start_server: StartServer, mail: MailSink) -> None:
    recorder = CommandRecorder()
    server = start_server(event_listeners=[recorder], **QUIET)
    jane = signed_up(server, mail)

    recorder.clear()
    reply = server.stub.GetUser(pb.GetUserRequest(id=jane.user.id))  # as the admin

    assert [c.name for c in recorder.commands if c.in_call] == ["find", "find"]
    assert reply.user.username == "jane"


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token whose signature PyJWT checks from now on (the server runs in this process)."""
    checked: list[str] = []
    decode = jwt.decode

    def counting(token: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("options", {}).get("verify_signature", True):
            checked.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return checked


@pytest.fixture
def token_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token PyJWT decodes from now on, its signature checked or not."""
    parsed: list[str] = []
    decode = jwt.decode

    def counting(token: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return parsed


def test_a_token_is_verified_by_signature_once(
    start_server: StartServer, mail: MailSink, signature_checks: list[str]
) -> None:
    server = start_server()
    jane = signed_up(server, mail)
    stub = server.stub_for(jane.access_token)

    for _ in range(5):
        stub.GetUser(pb.GetUserRequest(id=jane.user.id))
    stub.ListSessions(pb.ListSessionsRequest(user_id=jane.user.id))

    assert signature_checks.count(jane.access_token) == 1


def test_a_verified_token_is_not_parsed_by_pyjwt_again(
    start_server: StartServer, mail: MailSink, token_parses: list[str]
) -> None:
    server = start_server()
    jane = signed_up(server, mail)
    stub = server.stub_for(jane.access_token)

    for _ in range(3):
        stub.GetUser(pb.GetUserRequest(id=jane.user.id))

    # Telling a service account's token from a user's reads the payload by hand: PyJWT's
    # unverified decode alone cost a third of a cheap call.
    assert token_parses.count(jane.access_token) == 1


def test_a_cached_token_is_refused_once_expired(
    start_server: StartServer, mail: MailSink, signature_checks: list[str]
) -> None:
    clock = FakeClock(start=datetime.now(UTC))
    server = start_server(clock=clock)
    jane = signed_up(server, mail)
    stub = server.stub_for(jane.access_token)
    stub.GetUser(pb.GetUserRequest(id=jane.user.id))
    assert signature_checks.count(jane.access_token) == 1

    clock.advance(seconds=server.settings.access_token_ttl_seconds)

    error = rpc_error(stub.GetUser, pb.GetUserRequest(id=jane.user.id))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert signature_checks.count(jane.access_token) == 1  # refused from the cache, by its expiry


def test_a_cached_token_is_refused_once_its_sessions_are_revoked(
    start_server: StartServer, mail: MailSink, signature_checks: list[str]
) -> None:
    server = start_server()
    jane = signed_up(server, mail)
    stub = server.stub_for(jane.access_token)
    stub.GetUser(pb.GetUserRequest(id=jane.user.id))

    stub.RevokeAllSessions(pb.RevokeAllSessionsRequest(user_id=jane.user.id))

    error = rpc_error(stub.GetUser, pb.GetUserRequest(id=jane.user.id))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert signature_checks.count(jane.access_token) == 1


def test_a_cached_token_is_refused_once_its_key_is_retired(
    start_server: StartServer, mail: MailSink, signature_checks: list[str]
) -> None:
    server = start_server()
    jane = signed_up(server, mail)
    stub = server.stub_for(jane.access_token)
    stub.GetUser(pb.GetUserRequest(id=jane.user.id))
    old_kid = server.app.services.tokens.signing_kid
    assert old_kid is not None
    server.call(server.app.services.tokens.rotate())

    assert server.call(server.app.services.tokens.retire(old_kid))

    error = rpc_error(stub.GetUser, pb.GetUserRequest(id=jane.user.id))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
