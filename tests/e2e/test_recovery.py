"""Forgot, reset and change password through the real server, database and SMTP server."""

from __future__ import annotations

import statistics
import time

import grpc

from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    get_user_status,
    raw_collection,
    refresh_status,
    reset,
    reset_mails,
    reset_token,
    rpc_error,
    signed_up,
    wait_until,
    wait_until_mail_settled,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink, text_of
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users_grpc.config import MIN_BCRYPT_ROUNDS

THIRD_PASSWORD = "an attacker chose this one"


def sign_in(server: RunningServer, password: str) -> pb.AuthenticateResponse:
    return server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=password))


def test_forgot_password_answers_the_same_for_everyone_and_mails_only_active_accounts(
    server: RunningServer, mail: MailSink
) -> None:
    signed_up(server, mail)
    server.anonymous.CreateUser(
        pb.CreateUserRequest(
            username="idle", first_name="I", last_name="D", email="idle@example.com",
            password=PASSWORD, password_confirmation=PASSWORD,
        )
    )  # fmt: skip
    replies = {
        server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier=who)).SerializeToString()
        for who in ("jane", "idle", "nobody@example.com")
    }
    assert replies == {b""}
    assert reset_token(mail, "jane@example.com")
    assert reset_mails(mail, "idle@example.com") == []
    # Nothing changes until the token is used.
    assert sign_in(server, PASSWORD).user.username == "jane"


def test_reset_sets_the_password_once_and_revokes_every_session(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    session = signed_up(server, mail)
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane@example.com"))
    token = reset_token(mail, "jane@example.com")
    reply = reset(server, token)
    assert reply.SerializeToString() == b""  # no tokens: reset does not sign in

    assert get_user_status(server, session.access_token, session.user.id) == grpc.StatusCode.UNAUTHENTICATED
    assert refresh_status(server, session.refresh_token) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        rpc_error(server.anonymous.Authenticate, pb.AuthenticateRequest(identifier="jane", password=PASSWORD)).code()
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert sign_in(server, NEW_PASSWORD).user.id == session.user.id

    again = rpc_error(
        server.anonymous.ResetPassword,
        pb.ResetPasswordRequest(token=token, new_password=PASSWORD, new_password_confirmation=PASSWORD),
    )
    assert again.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_until(lambda: any(m["Subject"] == "Your password was reset" for m in mail.messages), what="the notice")
    with raw_collection(mongodb_uri, server.settings.mongodb_database, "outbox") as outbox:
        wait_until_mail_settled(outbox.database)  # a second copy, were there one, has arrived
    notice = [m for m in mail.messages if m["Subject"] == "Your password was reset"]
    assert len(notice) == 1
    assert token not in text_of(notice[0])


def test_parallel_resets_with_one_token_succeed_once(start_server: StartServer, mail: MailSink) -> None:
    # At the production floor: hashing the new password is the window the four resets race in.
    server = start_server(bcrypt_rounds=MIN_BCRYPT_ROUNDS)
    signed_up(server, mail)
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    passwords = [f"parallel passphrase {n}" for n in range(4)]
    futures = [
        server.anonymous.ResetPassword.future(
            pb.ResetPasswordRequest(token=token, new_password=p, new_password_confirmation=p)
        )
        for p in passwords
    ]
    assert sum(f.exception(timeout=60) is None for f in futures) == 1


def test_a_new_token_invalidates_the_old_and_sends_are_capped(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    signed_up(server, mail)
    for _ in range(5):
        server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    third = reset_token(mail, "jane@example.com", nth=3)
    first = reset_token(mail, "jane@example.com", nth=1)
    with raw_collection(
        mongodb_uri, server.settings.mongodb_database, "outbox"
    ) as outbox:  # a fourth reset mail, were there one, has arrived then
        wait_until_mail_settled(outbox.database)
    assert len(reset_mails(mail, "jane@example.com")) == server.settings.password_reset_max_sends == 3
    assert (
        rpc_error(
            server.anonymous.ResetPassword,
            pb.ResetPasswordRequest(token=first, new_password=NEW_PASSWORD, new_password_confirmation=NEW_PASSWORD),
        ).code()
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    reset(server, third)


def test_expired_reset_token_fails(start_server: StartServer, mail: MailSink) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    signed_up(server, mail)
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    clock.advance(seconds=server.settings.password_reset_ttl_seconds + 1)
    error = rpc_error(
        server.anonymous.ResetPassword,
        pb.ResetPasswordRequest(token=token, new_password=NEW_PASSWORD, new_password_confirmation=NEW_PASSWORD),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reset_applies_the_password_policy_and_keeps_the_token(server: RunningServer, mail: MailSink) -> None:
    signed_up(server, mail)
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    error = rpc_error(
        server.anonymous.ResetPassword,
        pb.ResetPasswordRequest(
            token=token, new_password="jane's password", new_password_confirmation="jane's password"
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    reset(server, token)  # the refused attempt did not use the token up


def test_change_password_needs_the_current_one_and_ends_sessions(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    own = server.stub_for(session.access_token)
    wrong = pb.ChangePasswordRequest(
        user_id=session.user.id, current_password="not my password", new_password=NEW_PASSWORD,
        new_password_confirmation=NEW_PASSWORD,
    )  # fmt: skip
    assert rpc_error(own.ChangePassword, wrong).code() == grpc.StatusCode.UNAUTHENTICATED
    right = pb.ChangePasswordRequest(
        user_id=session.user.id, current_password=PASSWORD, new_password=NEW_PASSWORD,
        new_password_confirmation=NEW_PASSWORD,
    )  # fmt: skip
    own.ChangePassword(right)
    assert get_user_status(server, session.access_token, session.user.id) == grpc.StatusCode.UNAUTHENTICATED
    assert refresh_status(server, session.refresh_token) == grpc.StatusCode.UNAUTHENTICATED
    assert sign_in(server, NEW_PASSWORD).user.id == session.user.id
    assert mail.wait_for("jane@example.com", 2)[1]["Subject"] == "Your password was changed"


def test_forgot_password_takes_as_long_for_missing_and_existing_accounts(server: RunningServer, mail: MailSink) -> None:
    """Without the reply floor, an existing (and capped) account answered ~3x slower than a missing one."""
    signed_up(server, mail)

    def elapsed(identifier: str) -> float:
        started = time.perf_counter()
        server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier=identifier))
        return time.perf_counter() - started

    existing = statistics.median(elapsed("jane") for _ in range(10))
    missing = statistics.median(elapsed("nobody@example.com") for _ in range(10))
    assert 0.8 < existing / missing < 1.25, (existing, missing)


def test_changing_the_password_kills_a_pending_reset_token(server: RunningServer, mail: MailSink) -> None:
    """ForgotPassword, then the owner changes the password: the old reset token must not reset it."""
    session = signed_up(server, mail)
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    server.stub_for(session.access_token).ChangePassword(
        pb.ChangePasswordRequest(
            user_id=session.user.id, current_password=PASSWORD, new_password=NEW_PASSWORD,
            new_password_confirmation=NEW_PASSWORD,
        )
    )  # fmt: skip
    stale = pb.ResetPasswordRequest(token=token, new_password=THIRD_PASSWORD, new_password_confirmation=THIRD_PASSWORD)
    assert rpc_error(server.anonymous.ResetPassword, stale).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sign_in(server, NEW_PASSWORD).user.id == session.user.id


def test_revoking_all_sessions_kills_a_pending_reset_token(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    server.stub_for(session.access_token).RevokeAllSessions(pb.RevokeAllSessionsRequest(user_id=session.user.id))
    stale = pb.ResetPasswordRequest(token=token, new_password=THIRD_PASSWORD, new_password_confirmation=THIRD_PASSWORD)
    assert rpc_error(server.anonymous.ResetPassword, stale).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sign_in(server, PASSWORD).user.id == session.user.id
    # A new request still works: only the pending token died.
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    reset(server, reset_token(mail, "jane@example.com", nth=2))
    assert sign_in(server, NEW_PASSWORD).user.id == session.user.id
