"""Security-relevant log lines say where a call came from and, where known, which user and
session: refusals, throttles and replays can be traced; no secret is ever in them."""

from __future__ import annotations

import json
import logging

import grpc
import pytest

from tests.support.calls import PASSWORD, lines_holding, refresh_status, rpc_error, signed_up
from tests.support.mail import MailSink
from tests.support.servers import RunningServer
from users.v1 import user_service_pb2 as pb
from users_grpc.grpc_api.logs import JsonFormatter

WRONG_PASSWORD = "not the password at all"


def test_security_log_lines_carry_source_user_and_session_but_no_secret(
    server: RunningServer, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    session = signed_up(server, mail)
    code = mail.code_for("jane@example.com")
    own = server.stub_for(session.access_token)
    assert rpc_error(server.anonymous.GetUser, pb.GetUserRequest(id=session.user.id)).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert rpc_error(own.GetUser, pb.GetUserRequest(id=server.admin_id)).code() == grpc.StatusCode.PERMISSION_DENIED
    wrong = pb.AuthenticateRequest(identifier="jane", password=WRONG_PASSWORD)
    assert rpc_error(server.anonymous.Authenticate, wrong).code() == grpc.StatusCode.UNAUTHENTICATED
    rotated = server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=session.refresh_token))
    assert refresh_status(server, session.refresh_token) == grpc.StatusCode.UNAUTHENTICATED  # a replay

    records = [record for record in caplog.records if record.name != "mail.log"]  # the test's own SMTP server
    refusals = {record.reason: record for record in records if record.getMessage() == "rpc refused"}  # type: ignore[attr-defined]
    # No token: nobody known, but where the call came from is.
    assert refusals["UNAUTHENTICATED"].source == "127.0.0.1"  # type: ignore[attr-defined]
    # A token the rule does not admit: who it was too.
    denied = refusals["PERMISSION_DENIED"]
    assert (denied.source, denied.caller_user_id, denied.caller_session_id) == (  # type: ignore[attr-defined]
        "127.0.0.1",
        session.user.id,
        session.session_id,
    )
    [refused_password] = [r for r in records if r.getMessage() == "credentials refused"]
    assert (refused_password.source, refused_password.user_id) == ("127.0.0.1", session.user.id)  # type: ignore[attr-defined]
    [replay] = [r for r in records if r.getMessage().startswith("refresh token replayed")]
    assert replay.levelno == logging.WARNING
    assert (replay.source, replay.user_id, replay.session_id) == (  # type: ignore[attr-defined]
        "127.0.0.1",
        session.user.id,
        session.session_id,
    )
    # The JSON lines the service writes carry the same fields.
    line = json.loads(JsonFormatter().format(replay))
    assert (line["source"], line["user_id"], line["session_id"]) == ("127.0.0.1", session.user.id, session.session_id)

    # As the service writes them, extras included: LogRecord's own fields (`created`,
    # `relativeCreated`) hold six-digit numbers that match a code by chance.
    logged = "\n".join(JsonFormatter().format(record) for record in records)
    secrets = [
        PASSWORD,
        WRONG_PASSWORD,
        code,
        session.access_token,
        session.refresh_token,
        rotated.access_token,
        rotated.refresh_token,
    ]
    for secret in secrets:
        assert not lines_holding(secret, logged)


def test_a_machine_callers_forwarded_address_is_the_source_of_its_calls_and_streams(
    server: RunningServer, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A service signing users in on their behalf names their address in x-forwarded-for's last
    entry (the one it added: those before it are the client's word); the call's source is that
    address, on a stream as on a unary call. Anyone else's x-forwarded-for is ignored."""
    caplog.set_level(logging.INFO)
    session = signed_up(server, mail)
    created = server.stub.CreateServiceAccount(pb.CreateServiceAccountRequest(name="gateway"))
    issued = server.anonymous.IssueServiceToken(
        pb.IssueServiceTokenRequest(client_id=created.service_account.client_id, client_secret=created.client_secret)
    )
    machine = server.stub_for(issued.access_token)
    forwarded = (("x-forwarded-for", "198.51.100.66, 203.0.113.9"),)  # a client's claim, then the gateway's
    nobody = pb.GetUserRequest(id="0" * 24)
    assert rpc_error(machine.GetUser, nobody, metadata=forwarded).code() == grpc.StatusCode.NOT_FOUND
    bad_cursor = pb.WatchUserChangesRequest(after="nonsense")
    watch = rpc_error(lambda r: list(machine.WatchUserChanges(r, metadata=forwarded, timeout=10)), bad_cursor)
    assert watch.code() == grpc.StatusCode.INVALID_ARGUMENT
    own = server.stub_for(session.access_token)
    user_call = rpc_error(own.GetUser, pb.GetUserRequest(id=server.admin_id), metadata=forwarded)
    assert user_call.code() == grpc.StatusCode.PERMISSION_DENIED

    refusals = {
        (record.rpc.rpartition("/")[2], record.reason): record.source  # type: ignore[attr-defined]
        for record in caplog.records
        if record.getMessage() == "rpc refused"
    }
    assert refusals[("GetUser", "USER_NOT_FOUND")] == "203.0.113.9"
    assert refusals[("WatchUserChanges", "INVALID_ARGUMENT")] == "203.0.113.9"
    assert refusals[("GetUser", "PERMISSION_DENIED")] == "127.0.0.1"
