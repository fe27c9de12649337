"""Changing a user's email (ChangeEmail, ConfirmEmailChange) and an admin setting one (SetUserEmail),
through a real channel, server, database and SMTP server."""

from __future__ import annotations

from typing import Any

import grpc
from pymongo import MongoClient

from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    create_request,
    error_info,
    lines_holding,
    raw_collection,
    reset_token,
    rpc_error,
    signed_up,
    stored_users,
    violated_fields,
    wait_until_mail_settled,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink, text_of
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb

OLD = "jane@example.com"
NEW = "jane.new@example.com"
REQUESTED = "A change of your email address was requested"
CHANGED = "Your email address was changed"


def sign_in_status(server: RunningServer, identifier: str) -> grpc.StatusCode:
    try:
        server.anonymous.Authenticate(pb.AuthenticateRequest(identifier=identifier, password=PASSWORD))
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def change(server: RunningServer, session: pb.AuthenticateResponse, new_email: str, password: str = PASSWORD) -> None:
    server.stub_for(session.access_token).ChangeEmail(
        pb.ChangeEmailRequest(user_id=session.user.id, new_email=new_email, password=password)
    )


def confirm_request(session: pb.AuthenticateResponse, code: str) -> pb.ConfirmEmailChangeRequest:
    return pb.ConfirmEmailChangeRequest(user_id=session.user.id, code=code)


def confirm(server: RunningServer, session: pb.AuthenticateResponse, code: str) -> pb.ConfirmEmailChangeResponse:
    return server.stub_for(session.access_token).ConfirmEmailChange(confirm_request(session, code))


def confirm_error(server: RunningServer, session: pb.AuthenticateResponse, code: str) -> grpc.RpcError:
    return rpc_error(server.stub_for(session.access_token).ConfirmEmailChange, confirm_request(session, code))


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def stored(server: RunningServer, mongodb_uri: str, user_id: str) -> dict[str, Any]:
    [document] = [d for d in stored_users(mongodb_uri, server.settings.mongodb_database) if str(d["_id"]) == user_id]
    return document


STORED = "Jane.New@example.com"


def test_the_code_goes_to_the_new_address_only_and_nothing_changes_until_it_comes_back(
    server: RunningServer, mail: MailSink
) -> None:
    server.anonymous.CreateUser(create_request(first_name="Zed", last_name="Quux"))
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=mail.code_for(OLD)))
    session = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))

    # Normalized as at registration: the domain lower-cased, the local part as typed.
    change(server, session, "Jane.New@EXAMPLE.com")
    code_mail = mail.wait_for(STORED)[0]
    code = mail.code_for(STORED)
    assert mail.recipients_of(code_mail) == [STORED]
    notice = mail.wait_for(OLD, 2)[1]  # after the activation mail
    assert notice["Subject"] == REQUESTED
    assert not lines_holding(code, text_of(notice))
    for message in (code_mail, notice):
        body = text_of(message)
        assert "Hello jane," in body
        assert "Zed" not in body
        assert "Quux" not in body

    # Until confirmation: the old address signs in and is the user's; the new one is nobody's.
    assert server.stub.GetUser(pb.GetUserRequest(id=session.user.id)).user.email == OLD
    assert sign_in_status(server, OLD) == grpc.StatusCode.OK
    assert sign_in_status(server, NEW) == grpc.StatusCode.UNAUTHENTICATED

    confirmed = confirm(server, session, code).user
    assert confirmed.email == STORED
    assert server.stub.GetUser(pb.GetUserRequest(id=session.user.id)).user == confirmed  # as stored
    assert sign_in_status(server, NEW) == grpc.StatusCode.OK
    assert sign_in_status(server, OLD) == grpc.StatusCode.UNAUTHENTICATED
    assert server.stub.GetUser(pb.GetUserRequest(id=session.user.id)).user.email == STORED
    changed = mail.wait_for(OLD, 3)[2]
    assert changed["Subject"] == CHANGED
    assert not lines_holding(code, text_of(changed))
    # Sessions survive the change: the token does not carry the email.
    own = server.stub_for(session.access_token)
    assert own.GetUser(pb.GetUserRequest(id=session.user.id)).user.email == STORED
    # The code went nowhere but the new address; the new address got nothing else.
    assert [m["Subject"] for m in mail.messages if m["To"] == STORED] == ["Confirm your new email address"]
    assert not [m for m in mail.messages if m is not code_mail and lines_holding(code, text_of(m))]


def test_a_taken_address_is_refused_at_confirmation_and_nothing_is_written(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    session = signed_up(server, mail)
    change(server, session, "taken@example.com")
    code = mail.code_for("taken@example.com")
    before = stored(server, mongodb_uri, session.user.id)
    # Meanwhile someone registers the address (in another letter case: the same key).
    server.anonymous.CreateUser(create_request(username="other", email="Taken@Example.com"))

    error = confirm_error(server, session, code)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(error).metadata["field"] == "email"
    after = stored(server, mongodb_uri, session.user.id)
    assert (after["email"], after["email_key"]) == (OLD, OLD)
    assert after["email_change"]["new_email"] == "taken@example.com"  # kept until it expires or is replaced
    assert {k: v for k, v in after.items() if k != "email_change"} == {
        k: v for k, v in before.items() if k != "email_change"
    }
    assert len(stored_users(mongodb_uri, server.settings.mongodb_database, email_key="taken@example.com")) == 1
    assert sign_in_status(server, OLD) == grpc.StatusCode.OK


def test_wrong_codes_are_capped_and_then_even_the_right_one_fails(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    change(server, session, NEW)
    code = mail.code_for(NEW)
    for _ in range(server.settings.activation_max_attempts):
        error = confirm_error(server, session, wrong(code))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "INVALID_EMAIL_CHANGE_CODE"
    assert confirm_error(server, session, code).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sign_in_status(server, OLD) == grpc.StatusCode.OK
    # A new request brings a fresh code with fresh attempts.
    change(server, session, NEW)
    assert confirm(server, session, mail.code_for(NEW, 2)).user.email == NEW


def test_a_code_works_once(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    change(server, session, NEW)
    code = mail.code_for(NEW)
    confirm(server, session, code)
    assert confirm_error(server, session, code).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_expired_code_fails(start_server: StartServer, mail: MailSink) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    session = signed_up(server, mail)
    change(server, session, NEW)
    code = mail.code_for(NEW)
    clock.advance(seconds=server.settings.email_change_code_ttl_seconds + 1)
    # A fresh sign-in: the first access token has expired too.
    session = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    error = confirm_error(server, session, code)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_EMAIL_CHANGE_CODE"
    assert sign_in_status(server, OLD) == grpc.StatusCode.OK


def test_a_code_confirms_only_the_address_it_was_mailed_to(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    session = signed_up(server, mail)
    # A newer request replaces the pending one: the first address's code is dead.
    change(server, session, "first@example.com")
    first_code = mail.code_for("first@example.com")
    change(server, session, "second@example.com")
    second_code = mail.code_for("second@example.com")
    if first_code != second_code:  # one in a million, they are the same digits
        assert confirm_error(server, session, first_code).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert confirm(server, session, second_code).user.email == "second@example.com"

    # The address is bound into the code's digest: moved to another address, a right code fails.
    change(server, session, "third@example.com")
    code = mail.code_for("third@example.com")
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        result = client[server.settings.mongodb_database].users.update_one(
            {"username": "jane"}, {"$set": {"email_change.new_email": "mallory@example.com"}}
        )
        assert result.modified_count == 1
    assert confirm_error(server, session, code).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sign_in_status(server, "second@example.com") == grpc.StatusCode.OK
    assert sign_in_status(server, "mallory@example.com") == grpc.StatusCode.UNAUTHENTICATED


def test_a_wrong_password_is_unauthenticated_and_counts_toward_the_throttle(
    start_server: StartServer, mail: MailSink
) -> None:
    # A clock that stands still: the throttle's delay never runs out during the test.
    server = start_server(clock=FakeClock(), password_free_attempts=2)
    session = signed_up(server, mail)
    own = server.stub_for(session.access_token)
    request = pb.ChangeEmailRequest(user_id=session.user.id, new_email=NEW, password="not my password")
    for _ in range(2):
        assert rpc_error(own.ChangeEmail, request).code() == grpc.StatusCode.UNAUTHENTICATED
    request.password = PASSWORD
    throttled = rpc_error(own.ChangeEmail, request)
    assert throttled.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(throttled).reason == "TOO_MANY_ATTEMPTS"
    # The same throttle as sign-in: the account is held there too, from this address.
    assert sign_in_status(server, "jane") == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_only_the_user_themself_may_change_their_email(server: RunningServer, mail: MailSink) -> None:
    alice, bob = signed_up(server, mail, "alice"), signed_up(server, mail, "bob")
    for stub in (server.stub_for(bob.access_token), server.stub):  # another user; an admin
        change_error = rpc_error(
            stub.ChangeEmail, pb.ChangeEmailRequest(user_id=alice.user.id, new_email=NEW, password=PASSWORD)
        )
        assert change_error.code() == grpc.StatusCode.PERMISSION_DENIED
        confirm_status = rpc_error(stub.ConfirmEmailChange, confirm_request(alice, "123456")).code()
        assert confirm_status == grpc.StatusCode.PERMISSION_DENIED
    no_token = rpc_error(server.anonymous.ConfirmEmailChange, confirm_request(alice, "123456"))
    assert no_token.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_input_is_invalid_argument_and_mails_nothing(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    own = server.stub_for(session.access_token)
    for new_email in ("", "not an address", "Jane <x@example.com>", OLD):
        error = rpc_error(
            own.ChangeEmail, pb.ChangeEmailRequest(user_id=session.user.id, new_email=new_email, password=PASSWORD)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, new_email
        assert violated_fields(error) == {"new_email"}, new_email
    error = rpc_error(own.ChangeEmail, pb.ChangeEmailRequest(user_id=session.user.id, new_email=NEW))
    assert violated_fields(error) == {"password"}
    fullwidth = "\uff11\uff12\uff13\uff14\uff15\uff16"  # digits of another script are no code
    for code in ("", "12345", fullwidth, "abcdef"):
        error = confirm_error(server, session, code)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, code
        assert violated_fields(error) == {"code"}, code
    # Only the activation mail ever went out.
    change(server, session, NEW)
    mail.wait_for(OLD, 2)
    assert [m["Subject"] for m in mail.messages if m["To"] == OLD] == ["Your activation code", REQUESTED]


def test_codes_mailed_per_window_are_capped(start_server: StartServer, mail: MailSink) -> None:
    server = start_server(activation_max_sends=2)
    session = signed_up(server, mail)
    change(server, session, NEW)
    change(server, session, NEW)
    error = rpc_error(
        server.stub_for(session.access_token).ChangeEmail,
        pb.ChangeEmailRequest(user_id=session.user.id, new_email=NEW, password=PASSWORD),
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error).reason == "TOO_MANY_ATTEMPTS"
    # The capped request replaced nothing: the newest mailed code still works.
    assert confirm(server, session, mail.code_for(NEW, 2)).user.email == NEW
    assert len(mail.wait_for(NEW, 2)) == 2


def test_an_admin_sets_an_email_at_once_and_the_old_address_is_told(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    session = signed_up(server, mail)
    change(server, session, "pending@example.com")  # a pending change dies with the admin's
    pending_code = mail.code_for("pending@example.com")

    user = server.stub.SetUserEmail(pb.SetUserEmailRequest(user_id=session.user.id, email="Jane@Bücher.example")).user
    assert user.email == "Jane@xn--bcher-kva.example"
    assert sign_in_status(server, "jane@bücher.example") == grpc.StatusCode.OK
    assert sign_in_status(server, OLD) == grpc.StatusCode.UNAUTHENTICATED
    notice = mail.wait_for(OLD, 3)[2]  # activation, the user's own request, then this
    assert notice["Subject"] == CHANGED
    assert "administrator" in text_of(notice)
    assert confirm_error(server, session, pending_code).code() == grpc.StatusCode.INVALID_ARGUMENT

    taken = rpc_error(
        server.stub.SetUserEmail,
        pb.SetUserEmailRequest(user_id=session.user.id, email=f"{server.admin_username}@EXAMPLE.com"),
    )
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(taken).metadata["field"] == "email"
    assert stored(server, mongodb_uri, session.user.id)["email"] == "Jane@xn--bcher-kva.example"

    missing = rpc_error(server.stub.SetUserEmail, pb.SetUserEmailRequest(user_id="f" * 24, email=NEW))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    invalid = rpc_error(server.stub.SetUserEmail, pb.SetUserEmailRequest(user_id=session.user.id, email="x@"))
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(invalid) == {"email"}
    own = rpc_error(
        server.stub_for(session.access_token).SetUserEmail, pb.SetUserEmailRequest(user_id=session.user.id, email=NEW)
    )
    assert own.code() == grpc.StatusCode.PERMISSION_DENIED


def test_of_two_users_confirming_one_address_at_once_one_gets_it(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    alice, bob = signed_up(server, mail, "alice"), signed_up(server, mail, "bob")
    for session in (alice, bob):
        change(server, session, "shared@example.com")
    codes = [mail.code_for("shared@example.com", n) for n in (1, 2)]
    futures = [
        server.stub_for(session.access_token).ConfirmEmailChange.future(confirm_request(session, code))
        for session, code in zip((alice, bob), codes, strict=True)
    ]
    errors = [f.exception(timeout=60) for f in futures]
    assert sum(error is None for error in errors) == 1
    [loser] = [error for error in errors if error is not None]
    assert loser.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    assert len(stored_users(mongodb_uri, server.settings.mongodb_database, email_key="shared@example.com")) == 1


def test_parallel_confirmations_with_one_code_succeed_once(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    session = signed_up(server, mail)
    change(server, session, NEW)
    code = mail.code_for(NEW)
    own = server.stub_for(session.access_token)
    futures = [own.ConfirmEmailChange.future(confirm_request(session, code)) for _ in range(4)]
    assert sum(f.exception(timeout=60) is None for f in futures) == 1
    assert mail.wait_for(OLD, 3)[2]["Subject"] == CHANGED
    with raw_collection(mongodb_uri, server.settings.mongodb_database, "outbox") as outbox:
        wait_until_mail_settled(outbox.database)  # a second notice, were there one, has arrived
    assert [m["Subject"] for m in mail.messages if m["To"] == OLD].count(CHANGED) == 1


def test_a_reset_token_mailed_to_the_old_address_dies_with_the_change(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, OLD)
    change(server, session, NEW)
    confirm(server, session, mail.code_for(NEW))
    error = rpc_error(
        server.anonymous.ResetPassword,
        pb.ResetPasswordRequest(token=token, new_password=NEW_PASSWORD, new_password_confirmation=NEW_PASSWORD),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sign_in_status(server, NEW) == grpc.StatusCode.OK


def test_a_pending_change_dies_with_a_lock_a_password_change_or_revoke_all(
    server: RunningServer, mail: MailSink
) -> None:
    """Found by an attack: a change asked for with a stolen token and password, then a lock and
    unlock (or a new password, or signing out everywhere), could still be confirmed afterwards."""
    session = signed_up(server, mail)
    for n, undo in enumerate(("lock", "password", "revoke-all")):
        target = f"thief{n}@evil.example"
        change(server, session, target, password=PASSWORD if n < 2 else NEW_PASSWORD)
        code = mail.code_for(target)
        if undo == "lock":
            server.stub.LockUser(pb.LockUserRequest(user_id=session.user.id))
            server.stub.UnlockUser(pb.UnlockUserRequest(user_id=session.user.id))
        elif undo == "password":
            server.stub_for(session.access_token).ChangePassword(
                pb.ChangePasswordRequest(
                    user_id=session.user.id,
                    current_password=PASSWORD,
                    new_password=NEW_PASSWORD,
                    new_password_confirmation=NEW_PASSWORD,
                )
            )
        else:
            server.stub_for(session.access_token).RevokeAllSessions(
                pb.RevokeAllSessionsRequest(user_id=session.user.id)
            )
        # Each of these ended the session; a fresh sign-in confirms with the code from before.
        password = PASSWORD if undo == "lock" else NEW_PASSWORD
        session = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=password))
        assert confirm_error(server, session, code).code() == grpc.StatusCode.INVALID_ARGUMENT, undo
        assert server.stub.GetUser(pb.GetUserRequest(id=session.user.id)).user.email == OLD
