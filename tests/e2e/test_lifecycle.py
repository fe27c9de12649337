"""The account lifecycle through a real channel, server, FerretDB and SMTP server."""

from __future__ import annotations

import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from tests.support.calls import (
    PASSWORD,
    create_request,
    error_info,
    raw_collection,
    rpc_error,
    stored_users,
    violated_fields,
    wait_until_mail_settled,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink, text_of
from tests.support.servers import RunningServer, StartServer
from users.v1 import group_pb2 as gpb
from users.v1 import metadata_pb2 as md
from users.v1 import passkey_pb2 as pk
from users.v1 import service_account_token_pb2 as tpb
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.config import MIN_BCRYPT_ROUNDS


def test_full_lifecycle(server: RunningServer, mail: MailSink) -> None:
    """Create, read the mailed code, activate, check credentials, look up, delete."""
    stub = server.stub
    created = stub.CreateUser(create_request()).user
    assert len(created.id) == 24
    assert created.is_active is False
    assert created.role == user_pb2.ROLE_USER

    code = mail.code_for("jane@example.com")
    activated = stub.ActivateUser(pb.ActivateUserRequest(identifier="Jane@Example.com", code=code)).user
    assert activated.is_active is True
    assert activated.updated_at.ToDatetime() >= created.created_at.ToDatetime()

    verified = stub.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD)).user
    assert verified.id == created.id
    assert stub.GetUser(pb.GetUserRequest(id=created.id)).user.username == "jane"
    found = stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier="JANE@EXAMPLE.COM")).user
    assert found.id == created.id

    stub.DeleteUser(pb.DeleteUserRequest(id=created.id))
    assert rpc_error(stub.GetUser, pb.GetUserRequest(id=created.id)).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.DeleteUser, pb.DeleteUserRequest(id=created.id)).code() == grpc.StatusCode.NOT_FOUND


def test_replies_and_mail_carry_no_secrets(server: RunningServer, mail: MailSink) -> None:
    """No reply holds the password, its hash or the code; the mail holds only the code."""
    reply = server.stub.CreateUser(create_request())
    code = mail.code_for("jane@example.com")
    activated = server.stub.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code))
    for message in (reply, activated):
        raw = message.SerializeToString()
        assert PASSWORD.encode() not in raw
        assert code.encode() not in raw
        assert b"$2b$" not in raw
    assert PASSWORD not in text_of(mail.wait_for("jane@example.com")[0])


def test_stored_password_is_bcrypt_with_cost_at_least_10(start_server: StartServer, mongodb_uri: str) -> None:
    # At the production floor: the suite's other servers hash at cost 4 (tests/support/servers.py).
    server = start_server(bcrypt_rounds=MIN_BCRYPT_ROUNDS)
    server.stub.CreateUser(create_request())
    [stored] = stored_users(mongodb_uri, server.settings.mongodb_database, username="jane")
    assert stored["password_hash"].startswith("$2b$10$")
    assert PASSWORD not in str(stored)


def test_parallel_registrations_of_one_email_store_one_user(server: RunningServer, mongodb_uri: str) -> None:
    """20 racing CreateUser calls for one email in different cases: one wins, the rest ALREADY_EXISTS."""
    emails = ["race@x.io", "RACE@x.io", "Race@X.io", "race@X.IO"]
    requests = [create_request(username=f"racer{i}", email=emails[i % len(emails)]) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        futures = [server.stub.CreateUser.future(request) for request in requests]
        outcomes = list(pool.map(lambda f: f.exception(timeout=60) or f.result(timeout=60), futures, timeout=150))
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(outcomes) - len(errors) == 1
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}
    assert {error_info(e).metadata["field"] for e in errors} == {"email"}
    assert len(stored_users(mongodb_uri, server.settings.mongodb_database, role="user")) == 1


def test_taken_username_is_named(server: RunningServer) -> None:
    server.stub.CreateUser(create_request())
    error = rpc_error(server.stub.CreateUser, create_request(username="JANE", email="other@example.com"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(error).metadata["field"] == "username"
    assert "username" in (error.details() or "")


def test_asking_for_admin_without_being_admin_is_permission_denied(server: RunningServer, mongodb_uri: str) -> None:
    """Nobody makes themself admin; an admin can make another."""
    error = rpc_error(server.anonymous.CreateUser, create_request(role=user_pb2.ROLE_ADMIN))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stored_users(mongodb_uri, server.settings.mongodb_database, username="jane") == []
    assert server.stub.CreateUser(create_request(role=user_pb2.ROLE_ADMIN)).user.role == user_pb2.ROLE_ADMIN


SELF = "SELF"
BAD_INPUT = [
    ("CreateUser", create_request(username=""), "username"),
    ("CreateUser", create_request(username="x" * 33), "username"),
    ("CreateUser", create_request(first_name=""), "first_name"),
    ("CreateUser", create_request(last_name="x" * 101), "last_name"),
    ("CreateUser", create_request(email="jane.example.com"), "email"),
    ("CreateUser", create_request(email="x" * 250 + "@a.io"), "email"),
    ("CreateUser", create_request(password="", password_confirmation=""), "password"),
    ("CreateUser", create_request(password="p" * 129, password_confirmation="p" * 129), "password"),
    ("CreateUser", create_request(password_confirmation="correct horse battery!"), "password_confirmation"),
    ("CreateUser", create_request(password="password1234", password_confirmation="password1234"), "password"),
    ("CreateUser", create_request(gender=42), "gender"),
    ("CreateUser", create_request(role=7), "role"),
    ("ActivateUser", pb.ActivateUserRequest(identifier="", code="123456"), "identifier"),
    ("ActivateUser", pb.ActivateUserRequest(identifier="jane", code=""), "code"),
    ("ActivateUser", pb.ActivateUserRequest(identifier="jane", code="12a456"), "code"),
    ("ActivateUser", pb.ActivateUserRequest(identifier="x" * 255, code="123456"), "identifier"),
    ("ResendActivationCode", pb.ResendActivationCodeRequest(identifier=""), "identifier"),
    ("ResendActivationCode", pb.ResendActivationCodeRequest(identifier="x" * 255), "identifier"),
    ("GetUser", pb.GetUserRequest(id=""), "id"),
    ("GetUser", pb.GetUserRequest(id="not-an-object-id-at-all!"), "id"),
    ("GetUserByIdentifier", pb.GetUserByIdentifierRequest(identifier="  "), "identifier"),
    ("DeleteUser", pb.DeleteUserRequest(id="123"), "id"),
    ("DeleteUser", pb.DeleteUserRequest(id=SELF, password=""), "password"),
    ("DeleteUserByIdentifier", pb.DeleteUserByIdentifierRequest(identifier=""), "identifier"),
    ("VerifyCredentials", pb.VerifyCredentialsRequest(identifier="", password="whatever it is"), "identifier"),
    ("VerifyCredentials", pb.VerifyCredentialsRequest(identifier="jane", password=""), "password"),
    ("VerifyCredentials", pb.VerifyCredentialsRequest(identifier="jane", password="p" * 200), "password"),
    ("Authenticate", pb.AuthenticateRequest(identifier="", password="whatever it is"), "identifier"),
    ("Authenticate", pb.AuthenticateRequest(identifier="jane", password="p" * 129), "password"),
    ("RefreshSession", pb.RefreshSessionRequest(refresh_token=""), "refresh_token"),
    ("RefreshSession", pb.RefreshSessionRequest(refresh_token="r" * 129), "refresh_token"),
    ("RevokeSession", pb.RevokeSessionRequest(refresh_token=""), "refresh_token"),
    ("ListSessions", pb.ListSessionsRequest(user_id="nope"), "user_id"),
    ("RevokeAllSessions", pb.RevokeAllSessionsRequest(user_id=""), "user_id"),
    ("ValidateToken", pb.ValidateTokenRequest(access_token=""), "access_token"),
    ("ForgotPassword", pb.ForgotPasswordRequest(identifier=""), "identifier"),
    (
        "ResetPassword",
        pb.ResetPasswordRequest(token="", new_password=PASSWORD, new_password_confirmation=PASSWORD),
        "token",
    ),
    (
        "ResetPassword",
        pb.ResetPasswordRequest(token="t" * 200, new_password=PASSWORD, new_password_confirmation=PASSWORD),
        "token",
    ),
    ("ImportUsers", pb.ImportUsersRequest(users=[pb.ImportedUser(username="u")] * 1001), "users"),
    ("CreateServiceAccount", pb.CreateServiceAccountRequest(name=""), "name"),
    ("IssueServiceToken", pb.IssueServiceTokenRequest(client_id="", client_secret="s"), "client_id"),
    ("IssueServiceToken", pb.IssueServiceTokenRequest(client_id="f" * 24, client_secret=""), "client_secret"),
    ("ListServiceAccounts", pb.ListServiceAccountsRequest(page_size=1001), "page_size"),
    ("ListServiceAccounts", pb.ListServiceAccountsRequest(page_token="junk"), "page_token"),
    ("DeleteServiceAccount", pb.DeleteServiceAccountRequest(client_id="x"), "client_id"),
    ("ListUsers", pb.ListUsersRequest(page_size=1001), "page_size"),
    ("ListUsers", pb.ListUsersRequest(page_token="junk"), "page_token"),
    ("ListUsers", pb.ListUsersRequest(prefix="x" * 255), "prefix"),
    ("ListUsers", pb.ListUsersRequest(state=user_pb2.UserState.ValueType(9)), "state"),
    ("ListAuditEvents", pb.ListAuditEventsRequest(page_size=1001), "page_size"),
    ("ListAuditEvents", pb.ListAuditEventsRequest(page_token="junk"), "page_token"),
    ("ListAuditEvents", pb.ListAuditEventsRequest(subject_id="nope"), "subject_id"),
    ("ListAuditEvents", pb.ListAuditEventsRequest(actor_id="x" * 257), "actor_id"),
    ("ListAuditEvents", pb.ListAuditEventsRequest(types=[pb.AuditEventType.ValueType(999)]), "types"),
    ("UpdateUser", pb.UpdateUserRequest(user_id="nope", update_mask=FieldMask(paths=["first_name"])), "user_id"),
    ("UpdateUser", pb.UpdateUserRequest(user_id=SELF), "update_mask"),
    ("UpdateUser", pb.UpdateUserRequest(user_id=SELF, update_mask=FieldMask(paths=["email"])), "update_mask"),
    (
        "UpdateUser",
        pb.UpdateUserRequest(
            user_id=SELF, user=user_pb2.User(username="x y"), update_mask=FieldMask(paths=["username"])
        ),
        "user.username",
    ),
    (
        "UpdateUser",
        pb.UpdateUserRequest(
            user_id=SELF, user=user_pb2.User(first_name="a\u2028b"), update_mask=FieldMask(paths=["first_name"])
        ),
        "user.first_name",
    ),
    (
        "UpdateUser",
        pb.UpdateUserRequest(
            user_id=SELF, user=user_pb2.User(last_name="Doe"), update_mask=FieldMask(paths=["last_name"]), etag="zz!"
        ),
        "etag",
    ),
    # The RPCs only a user may call about themself: SELF stands for the caller's own id.
    ("ChangePassword", pb.ChangePasswordRequest(user_id=SELF, current_password=""), "current_password"),
    (
        "ChangePassword",
        pb.ChangePasswordRequest(user_id=SELF, current_password="x", new_password="x" * 11),
        "new_password",
    ),
    ("EnableMfa", pb.EnableMfaRequest(user_id=SELF, password=""), "password"),
    ("ConfirmMfa", pb.ConfirmMfaRequest(user_id=SELF, code="12345"), "code"),
    ("DisableMfa", pb.DisableMfaRequest(user_id=SELF, password="", code="123456"), "password"),
    ("ChangeEmail", pb.ChangeEmailRequest(user_id=SELF, new_email="x@", password=PASSWORD), "new_email"),
    ("ChangeEmail", pb.ChangeEmailRequest(user_id=SELF, new_email="x@example.com", password=""), "password"),
    ("ConfirmEmailChange", pb.ConfirmEmailChangeRequest(user_id=SELF, code="12345"), "code"),
    ("SetUserEmail", pb.SetUserEmailRequest(user_id="nope", email="x@example.com"), "user_id"),
    ("SetUserEmail", pb.SetUserEmailRequest(user_id="f" * 24, email="x@"), "email"),
    ("SetPassword", pb.SetPasswordRequest(user_id="nope"), "user_id"),
    ("SetUserRole", pb.SetUserRoleRequest(user_id="nope", role=user_pb2.ROLE_USER), "user_id"),
    ("SetUserRole", pb.SetUserRoleRequest(user_id="f" * 24), "role"),
    ("SetUserRole", pb.SetUserRoleRequest(user_id="f" * 24, role=user_pb2.Role.ValueType(7)), "role"),
    ("DeactivateUser", pb.DeactivateUserRequest(user_id=""), "user_id"),
    ("ReactivateUser", pb.ReactivateUserRequest(user_id="F" * 24), "user_id"),
    ("LockUser", pb.LockUserRequest(user_id="123"), "user_id"),
    ("UnlockUser", pb.UnlockUserRequest(user_id=""), "user_id"),
    ("ResetUserMfa", pb.ResetUserMfaRequest(user_id="x" * 24), "user_id"),
    ("WatchUserChanges", pb.WatchUserChangesRequest(after="not a cursor"), "after"),
    ("CreateGroup", gpb.CreateGroupRequest(name=" "), "name"),
    ("CreateGroup", gpb.CreateGroupRequest(name="x" * 65), "name"),
    ("RenameGroup", gpb.RenameGroupRequest(group_id="nope", name="x"), "group_id"),
    ("RenameGroup", gpb.RenameGroupRequest(group_id="f" * 24, name="a\tb"), "name"),
    ("DeleteGroup", gpb.DeleteGroupRequest(group_id=""), "group_id"),
    ("ListGroups", gpb.ListGroupsRequest(page_size=1001), "page_size"),
    ("ListGroups", gpb.ListGroupsRequest(page_token="junk"), "page_token"),
    ("AddGroupMember", gpb.AddGroupMemberRequest(group_id="f" * 24, user_id="x"), "user_id"),
    ("RemoveGroupMember", gpb.RemoveGroupMemberRequest(group_id="x", user_id="f" * 24), "group_id"),
    ("ListGroupMembers", gpb.ListGroupMembersRequest(group_id="f" * 24, page_token="junk"), "page_token"),
    ("ListGroupMembers", gpb.ListGroupMembersRequest(group_id="f" * 24, page_size=-1), "page_size"),
    ("ListUserGroups", gpb.ListUserGroupsRequest(user_id="nope"), "user_id"),
    ("ListUserGroups", gpb.ListUserGroupsRequest(user_id="f" * 24, page_token="junk"), "page_token"),
    ("SetUserMetadata", md.SetUserMetadataRequest(user_id=SELF, scope=md.METADATA_SCOPE_SELF, key=""), "key"),
    ("SetUserMetadata", md.SetUserMetadataRequest(user_id=SELF, scope=md.METADATA_SCOPE_SELF, key="a/b"), "key"),
    ("GetUserMetadata", md.GetUserMetadataRequest(user_id=SELF, scope=md.METADATA_SCOPE_SELF, key=""), "key"),
    ("ListUserMetadata", md.ListUserMetadataRequest(user_id="nope"), "user_id"),
    ("DeleteUserMetadata", md.DeleteUserMetadataRequest(user_id=SELF, scope=md.METADATA_SCOPE_SELF, key=""), "key"),
    (
        "StartPasskeyRegistration",
        pk.StartPasskeyRegistrationRequest(user_id=SELF, password="x" * 10_000),
        "password",
    ),
    (
        "FinishPasskeyRegistration",
        pk.FinishPasskeyRegistrationRequest(user_id=SELF, credential_json="{}"),
        "ceremony_id",
    ),
    (
        "FinishPasskeyRegistration",
        pk.FinishPasskeyRegistrationRequest(
            user_id=SELF, ceremony_id="0" * 32, credential_json="{}", display_name="\x00"
        ),
        "display_name",
    ),
    ("StartPasskeySignIn", pk.StartPasskeySignInRequest(second_factor=True), "identifier"),
    ("FinishPasskeySignIn", pk.FinishPasskeySignInRequest(ceremony_id="0" * 32), "credential_json"),
    (
        "FinishPasskeySignIn",
        pk.FinishPasskeySignInRequest(ceremony_id="0" * 32, credential_json="[]"),
        "credential_json",
    ),
    ("RenamePasskey", pk.RenamePasskeyRequest(user_id=SELF, passkey_id="x", display_name="y"), "passkey_id"),
    ("RemovePasskey", pk.RemovePasskeyRequest(user_id=SELF, passkey_id="x"), "passkey_id"),
    ("ListUserAuthenticationFactors", pk.ListUserAuthenticationFactorsRequest(user_id="nope"), "user_id"),
    ("RemoveUserPasskey", pk.RemoveUserPasskeyRequest(user_id="f" * 24, passkey_id="x"), "passkey_id"),
    (
        "CreateServiceAccountToken",
        tpb.CreateServiceAccountTokenRequest(service_account_id="nope", display_name="x"),
        "service_account_id",
    ),
    (
        "CreateServiceAccountToken",
        tpb.CreateServiceAccountTokenRequest(service_account_id="f" * 24, display_name=""),
        "display_name",
    ),
    ("ListServiceAccountTokens", tpb.ListServiceAccountTokensRequest(service_account_id="nope"), "service_account_id"),
    (
        "RevokeServiceAccountToken",
        tpb.RevokeServiceAccountTokenRequest(service_account_id="f" * 24, token_id="nope"),
        "token_id",
    ),
]
# With a malformed user id nobody is "themself": those calls are PERMISSION_DENIED before any check.
NO_SELF_INPUT = {"GetMfaQrCode", "RegenerateRecoveryCodes"}
# With a malformed user id nobody is "themself" here either.
NO_SELF_INPUT |= {"ListAuthenticationFactors"}


@pytest.mark.parametrize(("rpc", "request_", "field"), BAD_INPUT, ids=[f"{r}-{f}" for r, _, f in BAD_INPUT])
def test_bad_input_is_invalid_argument_naming_the_field(
    server: RunningServer, rpc: str, request_: Any, field: str
) -> None:
    for subject in ("id", "user_id"):
        if getattr(request_, subject, None) == SELF:
            request_ = type(request_).FromString(request_.SerializeToString())
            setattr(request_, subject, server.admin_id)
    call = getattr(server.stub, rpc)
    if pb.DESCRIPTOR.services_by_name["UserService"].methods_by_name[rpc].server_streaming:
        stream = call
        call = lambda r: list(stream(r, timeout=10))  # noqa: E731 - a stream's status comes with its end
    error = rpc_error(call, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(error)


def test_bad_input_table_covers_every_rpc_that_takes_input() -> None:
    """A new RPC cannot be added without rows in the bad-input table."""
    methods = pb.DESCRIPTOR.services_by_name["UserService"].methods
    taking_input = {method.name for method in methods if method.input_type.fields}
    assert {rpc for rpc, _, _ in BAD_INPUT} | NO_SELF_INPUT == taking_input


def test_wrong_codes_kill_the_activation_code(server: RunningServer, mail: MailSink) -> None:
    """After five wrong codes, the right one is refused too."""
    server.stub.CreateUser(create_request())
    code = mail.code_for("jane@example.com")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(5):
        error = rpc_error(server.stub.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=wrong))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(server.stub.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=code))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_parallel_guesses_cannot_exceed_the_attempt_cap(server: RunningServer, mail: MailSink) -> None:
    """Ten wrong codes at once spend all five attempts; the right code then fails."""
    server.stub.CreateUser(create_request())
    code = mail.code_for("jane@example.com")
    wrong = [f"{(int(code) + n) % 1_000_000:06d}" for n in range(1, 11)]
    futures = [server.stub.ActivateUser.future(pb.ActivateUserRequest(identifier="jane", code=w)) for w in wrong]
    assert all(f.exception(timeout=60) is not None for f in futures)
    error = rpc_error(server.stub.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=code))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_parallel_activations_with_the_right_code_succeed_once(server: RunningServer, mail: MailSink) -> None:
    server.stub.CreateUser(create_request())
    request = pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com"))
    futures = [server.stub.ActivateUser.future(request) for _ in range(8)]
    assert sum(f.exception(timeout=60) is None for f in futures) == 1


def test_expired_code_is_refused(start_server: StartServer, mail: MailSink) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    server.stub.CreateUser(create_request())
    code = mail.code_for("jane@example.com")
    clock.advance(seconds=server.settings.activation_code_ttl_seconds + 1)
    error = rpc_error(server.stub.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=code))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_resend_replaces_the_code_and_looks_the_same_for_everyone(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    """The reply is identical for inactive, active and unknown accounts; only the newest code works."""
    server.stub.CreateUser(create_request())
    server.stub.CreateUser(create_request(username="active", email="active@example.com"))
    server.stub.ActivateUser(pb.ActivateUserRequest(identifier="active", code=mail.code_for("active@example.com")))
    first = mail.code_for("jane@example.com")
    replies = [
        server.stub.ResendActivationCode(pb.ResendActivationCodeRequest(identifier=identifier)).SerializeToString()
        for identifier in ("jane", "active", "nobody@example.com")
    ]
    assert len(set(replies)) == 1
    second = mail.code_for("jane@example.com", nth=2)
    if first != second:
        error = rpc_error(server.stub.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=first))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.stub.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=second)).user.is_active
    with raw_collection(mongodb_uri, server.settings.mongodb_database, "outbox") as outbox:
        wait_until_mail_settled(outbox.database)  # a resend to the active account, were there one, has arrived
    assert [m["To"] for m in mail.messages].count("active@example.com") == 1


def test_inactive_account_is_revealed_only_after_the_right_password(server: RunningServer) -> None:
    server.stub.CreateUser(create_request())
    wrong = rpc_error(server.stub.VerifyCredentials, pb.VerifyCredentialsRequest(identifier="jane", password="x" * 12))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    right = rpc_error(server.stub.VerifyCredentials, pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD))
    assert right.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_passwords_sharing_72_bytes_are_different_passwords(server: RunningServer, mail: MailSink) -> None:
    """bcrypt's 72-byte limit does not make long passwords interchangeable."""
    password = "a" * 72 + "first"
    server.stub.CreateUser(create_request(password=password, password_confirmation=password))
    server.stub.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com")))
    check = pb.VerifyCredentialsRequest(identifier="jane", password="a" * 72 + "other")
    assert rpc_error(server.stub.VerifyCredentials, check).code() == grpc.StatusCode.UNAUTHENTICATED
    ok = server.stub.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="jane", password=password))
    assert ok.user.username == "jane"


def test_get_by_identifier_skips_inactive_users(server: RunningServer) -> None:
    server.stub.CreateUser(create_request())
    error = rpc_error(server.stub.GetUserByIdentifier, pb.GetUserByIdentifierRequest(identifier="jane"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_delete_by_identifier(server: RunningServer) -> None:
    server.stub.CreateUser(create_request())
    server.stub.DeleteUserByIdentifier(pb.DeleteUserByIdentifierRequest(identifier="JANE@example.com"))
    error = rpc_error(server.stub.DeleteUserByIdentifier, pb.DeleteUserByIdentifierRequest(identifier="jane"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_password_is_normalized_once_the_same_way_everywhere(server: RunningServer, mail: MailSink) -> None:
    """An NFD password of 131 code points (109 after NFC) registered, then could never sign in:
    sign-in measured it raw (over 128) and the hash was over the raw text."""
    nfc = "é" * 22 + ("correct horse battery staple " * 4)[:87]
    nfd = unicodedata.normalize("NFD", nfc)
    assert (len(nfd), len(nfc)) == (131, 109)
    server.anonymous.CreateUser(create_request(password=nfd, password_confirmation=nfd))
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com")))
    for typed in (nfd, nfc):
        signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=typed))
        assert signed_in.user.username == "jane"
    # The minimum length counts the normalized form too: 22 code points are 11 characters.
    short_nfd = unicodedata.normalize("NFD", "é" * 11)
    error = rpc_error(
        server.anonymous.CreateUser,
        create_request(username="joe", email="joe@example.com", password=short_nfd, password_confirmation=short_nfd),
    )
    assert "password" in violated_fields(error)
