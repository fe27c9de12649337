"""The password policy through the real server, database, SMTP and a local range API: an admin's
SetPassword with change_required and its password-change token, history, expiry and the
breached-password check (hit, miss, padding, down and slow, failing open or closed)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tests.support.calls import PASSWORD, _detail, error_info, rpc_error, signed_up, stored_users, wait_until
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.pwned_range import RangeServer
from tests.support.servers import RunningServer, StartServer
from users.v1 import password_policy_pb2
from users.v1 import user_service_pb2 as pb

TEMPORARY = "temporary admin chosen words"
CHOSEN = "the user picked this one"


def set_password(server: RunningServer, user_id: str, password: str, *, change_required: bool = False) -> Any:
    return server.stub.SetPassword(
        pb.SetPasswordRequest(
            user_id=user_id, password=password, password_confirmation=password, change_required=change_required
        )
    )


def set_password_error(server: RunningServer, user_id: str, password: str) -> grpc.RpcError:
    return rpc_error(
        server.stub.SetPassword,
        pb.SetPasswordRequest(user_id=user_id, password=password, password_confirmation=password),
    )


def sign_in_error(server: RunningServer, password: str) -> grpc.RpcError:
    return rpc_error(server.anonymous.Authenticate, pb.AuthenticateRequest(identifier="jane", password=password))


def change(stub: Any, user_id: str, current: str, new: str) -> Any:
    return stub.ChangePassword(
        pb.ChangePasswordRequest(
            user_id=user_id, current_password=current, new_password=new, new_password_confirmation=new
        )
    )


def test_change_required_answers_a_token_that_allows_only_change_password(
    server: RunningServer, mail: MailSink
) -> None:
    jane = signed_up(server, mail)
    assert set_password(server, jane.user.id, TEMPORARY, change_required=True).user.password_change_required

    refused = sign_in_error(server, TEMPORARY)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused).reason == "PASSWORD_CHANGE_REQUIRED"
    assert error_info(refused).metadata == {}  # the token is in its own detail only
    ticket = _detail(refused, password_policy_pb2.PasswordChangeRequired)
    assert ticket.user_id == jane.user.id
    assert ticket.expire_time.seconds > 0
    token = ticket.password_change_token
    assert token not in (refused.details() or "")
    # A wrong password still answers as ever: the token comes only after the right one.
    assert sign_in_error(server, "not the password at all").code() == grpc.StatusCode.UNAUTHENTICATED

    restricted = server.stub_for(token)
    for call, request in (
        (restricted.GetUser, pb.GetUserRequest(id=jane.user.id)),
        (restricted.ListSessions, pb.ListSessionsRequest(user_id=jane.user.id)),
        (restricted.RevokeAllSessions, pb.RevokeAllSessionsRequest(user_id=jane.user.id)),
        (restricted.RefreshSession, pb.RefreshSessionRequest(refresh_token=jane.refresh_token)),
        (restricted.UpdateUser, pb.UpdateUserRequest(user_id=jane.user.id)),
        (restricted.EnableMfa, pb.EnableMfaRequest(user_id=jane.user.id, password=TEMPORARY)),
        (restricted.GetPublicKeys, pb.GetPublicKeysRequest()),
    ):
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, call
        assert error_info(error).reason == "PASSWORD_CHANGE_ONLY"
    # Nor is it a user's access token anywhere else: ValidateToken refuses it.
    validated = rpc_error(server.stub.ValidateToken, pb.ValidateTokenRequest(access_token=token))
    assert validated.code() == grpc.StatusCode.UNAUTHENTICATED

    change(restricted, jane.user.id, TEMPORARY, CHOSEN)
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=CHOSEN))
    assert not signed_in.user.password_change_required
    # The change ended the token (the token version moved on).
    used = rpc_error(restricted.ChangePassword, pb.ChangePasswordRequest(user_id=jane.user.id))
    assert used.code() == grpc.StatusCode.UNAUTHENTICATED


def test_set_password_is_for_admins_and_audited_without_the_password(server: RunningServer, mail: MailSink) -> None:
    jane = signed_up(server, mail)
    denied = rpc_error(
        server.stub_for(jane.access_token).SetPassword,
        pb.SetPasswordRequest(user_id=jane.user.id, password=TEMPORARY, password_confirmation=TEMPORARY),
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    set_password(server, jane.user.id, TEMPORARY, change_required=True)
    token = _detail(sign_in_error(server, TEMPORARY), password_policy_pb2.PasswordChangeRequired).password_change_token

    def events() -> list[Any]:
        request = pb.ListAuditEventsRequest(page_size=100, types=[pb.AUDIT_EVENT_TYPE_PASSWORD_SET])
        return list(server.stub.ListAuditEvents(request).audit_events)

    wait_until(lambda: len(events()) == 1, what="the SetPassword audit event")
    (event,) = events()
    assert (event.subject_id, event.actor.id, event.note) == (jane.user.id, server.admin_id, "change required")
    everything = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000)).SerializeToString()
    assert TEMPORARY.encode() not in everything
    assert token.encode() not in everything


def test_the_last_n_passwords_are_refused_and_only_n_hashes_kept(
    start_server: StartServer, mail: MailSink, mongodb_uri: str
) -> None:
    server = start_server(password_history=3)
    jane = signed_up(server, mail)
    set_password(server, jane.user.id, "second password here")
    set_password(server, jane.user.id, "third password here")
    for reused in (PASSWORD, "second password here", "third password here"):
        refused = set_password_error(server, jane.user.id, reused)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(refused).reason == "PASSWORD_REUSED"
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password="third password here"))
    by_change = rpc_error(
        server.stub_for(signed_in.access_token).ChangePassword,
        pb.ChangePasswordRequest(
            user_id=jane.user.id,
            current_password="third password here",
            new_password="second password here",
            new_password_confirmation="second password here",
        ),
    )
    assert error_info(by_change).reason == "PASSWORD_REUSED"

    set_password(server, jane.user.id, "fourth password here")
    (stored,) = stored_users(mongodb_uri, server.settings.mongodb_database, username="jane")
    assert len(stored["password_history"]) == 3
    assert stored["password_history"][-1] == stored["password_hash"]
    # The oldest has left the last three: it may be chosen again.
    set_password(server, jane.user.id, PASSWORD)


def test_a_password_past_its_maximum_age_must_be_changed_at_sign_in(start_server: StartServer, mail: MailSink) -> None:
    clock = FakeClock()
    server = start_server(clock=clock, password_max_age_seconds=86400)
    jane = signed_up(server, mail)
    clock.advance(days=2)
    refused = sign_in_error(server, PASSWORD)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused).reason == "PASSWORD_EXPIRED"
    token = _detail(refused, password_policy_pb2.PasswordChangeRequired).password_change_token
    change(server.stub_for(token), jane.user.id, PASSWORD, CHOSEN)
    assert server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=CHOSEN)).access_token


def test_breached_passwords_are_refused_by_their_prefix_only(
    start_server: StartServer, mail: MailSink, pwned_range: RangeServer
) -> None:
    server = start_server(breached_password_url=pwned_range.url)
    jane = signed_up(server, mail)
    pwned_range.add("breached but long enough", 42)
    pwned_range.pad("padded entry password")

    refused = set_password_error(server, jane.user.id, "breached but long enough")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused).reason == "PASSWORD_BREACHED"
    sign_up = rpc_error(
        server.anonymous.CreateUser,
        pb.CreateUserRequest(
            username="joe", first_name="J", last_name="D", email="joe@example.com",
            password="breached but long enough", password_confirmation="breached but long enough",
        ),
    )  # fmt: skip
    assert error_info(sign_up).reason == "PASSWORD_BREACHED"
    set_password(server, jane.user.id, "padded entry password")  # count 0: padding, not a breach
    set_password(server, jane.user.id, "never seen anywhere before")

    paths = [path for path, _ in pwned_range.requests]
    assert {len(path.rsplit("/", 1)[-1]) for path in paths} == {5}
    assert all(headers.get("Add-Padding") == "true" for _, headers in pwned_range.requests)


@pytest.mark.parametrize("fails_closed", [False, True])
@pytest.mark.parametrize("outage", ["down", "slow"])
def test_an_unanswered_breach_check_fails_open_or_closed_as_set(
    start_server: StartServer, mail: MailSink, pwned_range: RangeServer, outage: str, fails_closed: bool
) -> None:
    server = start_server(
        breached_password_url=pwned_range.url,
        breached_password_timeout_seconds=0.3,
        breached_password_fail_closed=fails_closed,
    )
    jane = signed_up(server, mail)
    if outage == "down":
        pwned_range.close()  # nothing listens any more: connection refused
    else:
        pwned_range.hang = True  # answers nothing until the test ends: past any timeout
    if not fails_closed:
        assert set_password(server, jane.user.id, "taken while unchecked").user.id == jane.user.id
        return
    refused = set_password_error(server, jane.user.id, "refused while unchecked")
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(refused).reason == "PASSWORD_CHECK_UNAVAILABLE"
