"""The audit trail through real channels and the real database: every kind of event is recorded
with its actor and subject, ListAuditEvents pages and filters it (admins only), housekeeping
purges it, a failed audit write never fails the call, and no secret the tests used is in it."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import bcrypt
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from pymongo import MongoClient

from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    create_request,
    error_info,
    independent_totp,
    lines_holding,
    reset,
    reset_token,
    rpc_error,
    signed_up,
    violated_fields,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.pki import Pki, channel_credentials, tls_settings
from tests.support.servers import ADMIN_PASSWORD, RunningServer, StartServer
from users.v1 import group_pb2 as gpb
from users.v1 import metadata_pb2 as md
from users.v1 import service_account_token_pb2 as tpb
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb

T = pb.AuditEventType
PASSKEY_EVENT_TYPES = {value for name, value in T.items() if name.startswith("AUDIT_EVENT_TYPE_PASSKEY_")}
USER = pb.AUDIT_ACTOR_KIND_USER
ANONYMOUS = pb.AUDIT_ACTOR_KIND_ANONYMOUS
MACHINE = pb.AUDIT_ACTOR_KIND_MACHINE
SERVICE_ACCOUNT = pb.AUDIT_ACTOR_KIND_SERVICE_ACCOUNT
OK = 0
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
THIRD_PASSWORD = "yet another passphrase"
WRONG_PASSWORD = "not the password at all"
# What a person types into the username field by mistake: it must not end up in the trail.
TYPED_SECRET = "hunter2-typed-as-a-username"
IMPORTED_PASSWORD = "an imported passphrase"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC))


def audit_events(stub: Any, **filters: Any) -> list[pb.AuditEvent]:
    """Every event matching ``filters``, newest first, paged through."""
    events: list[pb.AuditEvent] = []
    token = ""
    while True:
        page = stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000, page_token=token, **filters))
        events.extend(page.audit_events)
        token = page.next_page_token
        if not token:
            return events


def has(
    events: Iterable[pb.AuditEvent],
    type_: int,
    *,
    actor: tuple[int, str],
    subject: str,
    status: int = OK,
    reason: str | None = None,
) -> bool:
    return any(
        e.type == type_
        and (e.actor.kind, e.actor.id) == actor
        and e.subject_id == subject
        and e.status_code == status
        and (reason is None or e.note == reason)
        for e in events
    )


def stored_audit(server: RunningServer) -> list[dict[str, Any]]:
    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri)
    with client:
        return list(client[server.settings.mongodb_database].audit_events.find())


def strings_in(value: object) -> list[str]:
    """Every string in a stored document, keys included (ids and dates are not strings: no secret hides there)."""
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in [str(key), *strings_in(item)]]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    return [value] if isinstance(value, str) else []


def assert_no_secrets(server: RunningServer, secrets: Iterable[str], log_text: str) -> None:
    """None of ``secrets`` is anywhere in the stored audit trail, nor in the server's log."""
    documents = stored_audit(server)
    assert documents
    stored = "\n".join(text for document in documents for text in strings_in(document))
    for secret in secrets:
        assert not lines_holding(secret, stored)
        assert not lines_holding(secret, log_text)


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def test_every_event_kind_is_recorded_with_its_actor_and_subject_and_no_secret(
    start_server: StartServer, mail: MailSink, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="users_grpc")
    server = start_server(clock=clock)
    admin = (USER, server.admin_id)
    secrets = [PASSWORD, NEW_PASSWORD, THIRD_PASSWORD, WRONG_PASSWORD, TYPED_SECRET, IMPORTED_PASSWORD, ADMIN_PASSWORD]
    secrets.append(server.admin_token)

    # Sign-ins: a success, a wrong password, an unknown account (a password typed as the username).
    session = signed_up(server, mail)
    jane = session.user.id
    secrets += [session.access_token, session.refresh_token, mail.code_for("jane@example.com")]
    wrong = pb.AuthenticateRequest(identifier="jane", password=WRONG_PASSWORD)
    assert error_info(rpc_error(server.anonymous.Authenticate, wrong)).reason == "INVALID_CREDENTIALS"
    unknown = pb.AuthenticateRequest(identifier=TYPED_SECRET, password=WRONG_PASSWORD)
    assert rpc_error(server.anonymous.Authenticate, unknown).code() == grpc.StatusCode.UNAUTHENTICATED

    def sign_in(password: str = PASSWORD, **factors: str) -> Any:
        signed_in = server.anonymous.Authenticate(
            pb.AuthenticateRequest(identifier="jane", password=password, **factors)
        )
        secrets.extend([signed_in.access_token, signed_in.refresh_token])
        return server.stub_for(signed_in.access_token)

    # MFA: enroll, confirm (on), regenerate recovery codes, off; then a pending enrollment an admin resets.
    own = server.stub_for(session.access_token)
    enrollment = own.EnableMfa(pb.EnableMfaRequest(user_id=jane, password=PASSWORD))
    secrets.append(enrollment.secret)

    def totp() -> str:
        clock.advance(seconds=30)  # each code's step works once
        code = independent_totp(enrollment.secret, clock.now().timestamp())
        secrets.append(code)
        return code

    confirmed = own.ConfirmMfa(pb.ConfirmMfaRequest(user_id=jane, code=totp()))
    secrets += list(confirmed.recovery_codes)
    own = sign_in(totp_code=totp())
    regenerated = own.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(user_id=jane, code=totp()))
    secrets += list(regenerated.recovery_codes)
    own.DisableMfa(pb.DisableMfaRequest(user_id=jane, password=PASSWORD, code=totp()))
    own = sign_in()
    enrollment = own.EnableMfa(pb.EnableMfaRequest(user_id=jane, password=PASSWORD))
    secrets.append(enrollment.secret)
    server.stub.ResetUserMfa(pb.ResetUserMfaRequest(user_id=jane))
    own = sign_in()

    # Passwords: a change by the user, a reset by token (anonymous).
    own.ChangePassword(
        pb.ChangePasswordRequest(
            user_id=jane, current_password=PASSWORD, new_password=NEW_PASSWORD, new_password_confirmation=NEW_PASSWORD
        )
    )
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    secrets.append(token)
    reset(server, token, THIRD_PASSWORD)
    own = sign_in(THIRD_PASSWORD)

    # Email: asked for and confirmed by the user; set by an admin.
    own.ChangeEmail(pb.ChangeEmailRequest(user_id=jane, new_email="jane@new.example", password=THIRD_PASSWORD))
    code = mail.code_for("jane@new.example")
    secrets.append(code)
    own.ConfirmEmailChange(pb.ConfirmEmailChangeRequest(user_id=jane, code=code))
    server.stub.SetUserEmail(pb.SetUserEmailRequest(user_id=jane, email="jane@example.org"))

    # A profile change and sign-out everywhere, by the user.
    own.UpdateUser(
        pb.UpdateUserRequest(
            user_id=jane, user=user_pb2.User(first_name="Janet"), update_mask=FieldMask(paths=["first_name"])
        )
    )
    # Metadata: set by the user (their own scope), removed by an admin.
    own.SetUserMetadata(md.SetUserMetadataRequest(user_id=jane, scope=md.METADATA_SCOPE_SELF, key="theme", value=b"x"))
    server.stub.DeleteUserMetadata(
        md.DeleteUserMetadataRequest(user_id=jane, scope=md.METADATA_SCOPE_SELF, key="theme")
    )
    own.RevokeAllSessions(pb.RevokeAllSessionsRequest(user_id=jane))

    # Admin actions: roles (one refused), states, a credential check.
    server.stub.SetUserRole(pb.SetUserRoleRequest(user_id=jane, role=user_pb2.ROLE_ADMIN))
    server.stub.SetUserRole(pb.SetUserRoleRequest(user_id=jane, role=user_pb2.ROLE_USER))
    last_admin = pb.SetUserRoleRequest(user_id=server.admin_id, role=user_pb2.ROLE_USER)
    assert error_info(rpc_error(server.stub.SetUserRole, last_admin)).reason == "LAST_ACTIVE_ADMIN"
    for method in ("DeactivateUser", "ReactivateUser", "LockUser", "UnlockUser"):
        getattr(server.stub, method)(getattr(pb, f"{method}Request")(user_id=jane))
    server.stub.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="jane", password=THIRD_PASSWORD))

    # An import of two users (one refused), both deleted again: by id and by identifier.
    password_hash = bcrypt.hashpw(IMPORTED_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    secrets.append(password_hash)
    imported = server.stub.ImportUsers(
        pb.ImportUsersRequest(
            users=[
                pb.ImportedUser(
                    username=name,
                    first_name="Im",
                    last_name="Ported",
                    email=f"{name}@example.com",
                    email_verified=True,
                    password_hash=password_hash,
                )
                for name in ("ada", "ada")
            ]
        )
    )
    ada = imported.results[0].user.id
    server.stub.DeleteUser(pb.DeleteUserRequest(id=ada))
    server.anonymous.CreateUser(create_request(username="bob", email="bob@example.com"))
    secrets.append(mail.code_for("bob@example.com"))
    bob = server.stub.ListUsers(pb.ListUsersRequest(prefix="bob")).users[0].id
    server.stub.DeleteUserByIdentifier(pb.DeleteUserByIdentifierRequest(identifier="bob"))

    # Service accounts: created, a token issued (and a wrong secret refused), used, deleted.
    created = server.stub.CreateServiceAccount(pb.CreateServiceAccountRequest(name="billing"))
    client_id, client_secret = created.service_account.client_id, created.client_secret
    secrets.append(client_secret)
    issued = server.anonymous.IssueServiceToken(
        pb.IssueServiceTokenRequest(client_id=client_id, client_secret=client_secret)
    )
    secrets.append(issued.access_token)
    bad_secret = pb.IssueServiceTokenRequest(client_id=client_id, client_secret=client_secret[::-1])
    assert rpc_error(server.anonymous.IssueServiceToken, bad_secret).code() == grpc.StatusCode.UNAUTHENTICATED
    machine = server.stub_for(issued.access_token)
    machine.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="jane", password=THIRD_PASSWORD))
    # A long-lived token of the account: made, used (the same actor), refused once revoked.
    made = server.stub.CreateServiceAccountToken(
        tpb.CreateServiceAccountTokenRequest(service_account_id=client_id, display_name="scim")
    )
    token_id = made.service_account_token.id
    secrets += [made.token, made.token[-43:]]
    long_lived = server.stub_for(made.token)
    long_lived.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="jane", password=THIRD_PASSWORD))
    server.stub.RevokeServiceAccountToken(
        tpb.RevokeServiceAccountTokenRequest(service_account_id=client_id, token_id=token_id)
    )
    refused_token = pb.GetUserByIdentifierRequest(identifier="jane")
    assert rpc_error(long_lived.GetUserByIdentifier, refused_token).code() == grpc.StatusCode.UNAUTHENTICATED
    server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=client_id))

    # Groups: created, renamed, jane added and removed, deleted.
    group = server.stub.CreateGroup(gpb.CreateGroupRequest(name="team")).group.id
    server.stub.RenameGroup(gpb.RenameGroupRequest(group_id=group, name="crew"))
    server.stub.AddGroupMember(gpb.AddGroupMemberRequest(group_id=group, user_id=jane))
    server.stub.RemoveGroupMember(gpb.RemoveGroupMemberRequest(group_id=group, user_id=jane))
    server.stub.DeleteGroup(gpb.DeleteGroupRequest(group_id=group))
    # An admin sets jane's password, to be changed at her next sign-in.
    set_by_admin = "orbit lantern staple quietly"
    secrets.append(set_by_admin)
    server.stub.SetPassword(
        pb.SetPasswordRequest(
            user_id=jane, password=set_by_admin, password_confirmation=set_by_admin, change_required=True
        )
    )

    events = audit_events(server.stub)
    # The passkey events need an authenticator: tests/e2e/test_passkeys.py records each of them.
    assert {e.type for e in events} == set(T.values()) - {pb.AUDIT_EVENT_TYPE_UNSPECIFIED} - PASSKEY_EVENT_TYPES
    anonymous = (ANONYMOUS, "")
    user = (USER, jane)
    expected: list[tuple[pb.AuditEventType.ValueType, tuple[int, str], str, dict[str, Any]]] = [
        (pb.AUDIT_EVENT_TYPE_SIGN_IN, anonymous, jane, {}),
        (pb.AUDIT_EVENT_TYPE_SIGN_IN, anonymous, jane, {"status": UNAUTHENTICATED}),
        (pb.AUDIT_EVENT_TYPE_SIGN_IN, anonymous, "", {"status": UNAUTHENTICATED}),  # the unknown account
        (pb.AUDIT_EVENT_TYPE_MFA_ENROLL, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_MFA_ENABLE, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_RECOVERY_CODES_REGENERATE, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_MFA_DISABLE, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_MFA_RESET, admin, jane, {}),
        (pb.AUDIT_EVENT_TYPE_PASSWORD_CHANGE, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_PASSWORD_RESET, anonymous, jane, {}),
        (pb.AUDIT_EVENT_TYPE_EMAIL_CHANGE_REQUEST, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_EMAIL_CHANGE_CONFIRM, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_EMAIL_SET, admin, jane, {}),
        (pb.AUDIT_EVENT_TYPE_PROFILE_UPDATE, user, jane, {"reason": "fields first_name"}),
        (pb.AUDIT_EVENT_TYPE_METADATA_SET, user, jane, {"reason": "scope METADATA_SCOPE_SELF, key theme"}),
        (pb.AUDIT_EVENT_TYPE_METADATA_DELETE, admin, jane, {"reason": "scope METADATA_SCOPE_SELF, key theme"}),
        (pb.AUDIT_EVENT_TYPE_SESSIONS_REVOKE, user, jane, {}),
        (pb.AUDIT_EVENT_TYPE_ROLE_CHANGE, admin, jane, {"reason": "role ROLE_ADMIN"}),
        (pb.AUDIT_EVENT_TYPE_ROLE_CHANGE, admin, jane, {"reason": "role ROLE_USER"}),
        (pb.AUDIT_EVENT_TYPE_ROLE_CHANGE, admin, server.admin_id, {"status": FAILED_PRECONDITION}),
        (pb.AUDIT_EVENT_TYPE_USER_DEACTIVATE, admin, jane, {}),
        (pb.AUDIT_EVENT_TYPE_USER_REACTIVATE, admin, jane, {}),
        (pb.AUDIT_EVENT_TYPE_USER_LOCK, admin, jane, {}),
        (pb.AUDIT_EVENT_TYPE_USER_UNLOCK, admin, jane, {}),
        (pb.AUDIT_EVENT_TYPE_CREDENTIALS_CHECK, admin, jane, {}),
        (pb.AUDIT_EVENT_TYPE_USERS_IMPORT, admin, "", {"reason": "created 1, refused 1"}),
        (pb.AUDIT_EVENT_TYPE_USER_DELETE, admin, ada, {}),
        (pb.AUDIT_EVENT_TYPE_USER_DELETE, admin, bob, {}),
        (pb.AUDIT_EVENT_TYPE_SERVICE_ACCOUNT_CREATE, admin, client_id, {}),
        (pb.AUDIT_EVENT_TYPE_SERVICE_TOKEN_ISSUE, anonymous, client_id, {}),
        (pb.AUDIT_EVENT_TYPE_SERVICE_TOKEN_ISSUE, anonymous, client_id, {"status": UNAUTHENTICATED}),
        (pb.AUDIT_EVENT_TYPE_CREDENTIALS_CHECK, (SERVICE_ACCOUNT, client_id), jane, {}),
        (pb.AUDIT_EVENT_TYPE_SERVICE_ACCOUNT_TOKEN_CREATE, admin, client_id, {"reason": f"token {token_id}"}),
        (pb.AUDIT_EVENT_TYPE_SERVICE_ACCOUNT_TOKEN_REVOKE, admin, client_id, {"reason": f"token {token_id}"}),
        (pb.AUDIT_EVENT_TYPE_SERVICE_ACCOUNT_DELETE, admin, client_id, {}),
        (pb.AUDIT_EVENT_TYPE_GROUP_CREATE, admin, group, {}),
        (pb.AUDIT_EVENT_TYPE_GROUP_RENAME, admin, group, {}),
        (pb.AUDIT_EVENT_TYPE_GROUP_MEMBER_ADD, admin, jane, {"reason": f"group {group}"}),
        (pb.AUDIT_EVENT_TYPE_GROUP_MEMBER_REMOVE, admin, jane, {"reason": f"group {group}"}),
        (pb.AUDIT_EVENT_TYPE_GROUP_DELETE, admin, group, {}),
        (pb.AUDIT_EVENT_TYPE_PASSWORD_SET, admin, jane, {"reason": "change required"}),
    ]
    for type_, actor, subject, more in expected:
        assert has(events, type_, actor=actor, subject=subject, **more), (T.Name(type_), actor, subject, more)
    # Both of the account's tokens (IssueServiceToken's and the long-lived one) act as the account.
    by_account = [e for e in events if (e.actor.kind, e.actor.id) == (SERVICE_ACCOUNT, client_id)]
    assert [e.type for e in by_account] == [pb.AUDIT_EVENT_TYPE_CREDENTIALS_CHECK] * 2
    # Every event names where it came from; a failure names its ErrorInfo reason.
    assert all(e.actor.source_address == "127.0.0.1" for e in events)
    refused = next(e for e in events if e.type == pb.AUDIT_EVENT_TYPE_ROLE_CHANGE and e.status_code)
    assert refused.error_reason == "LAST_ACTIVE_ADMIN"
    assert {e.error_reason for e in events if e.type == pb.AUDIT_EVENT_TYPE_SIGN_IN and e.status_code} == {
        "INVALID_CREDENTIALS"
    }

    assert_no_secrets(server, secrets, caplog.text)


def test_a_machine_caller_by_certificate_is_recorded_as_a_machine(start_server: StartServer, pki: Pki) -> None:
    server = start_server(credentials=channel_credentials(pki, pki.billing), **tls_settings(pki, mutual=True))
    # server.anonymous sends no token, but its channel presents billing-service's certificate.
    check = pb.VerifyCredentialsRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
    server.anonymous.VerifyCredentials(check)
    events = audit_events(server.stub, types=[pb.AUDIT_EVENT_TYPE_CREDENTIALS_CHECK])
    assert [(e.actor.kind, e.actor.id, e.actor.source_address, e.subject_id) for e in events] == [
        (MACHINE, "billing-service", "127.0.0.1", server.admin_id)
    ]


def test_pages_are_newest_first_stable_under_new_events_and_filters_combine(
    start_server: StartServer, mail: MailSink, clock: FakeClock
) -> None:
    server = start_server(clock=clock)
    alice = signed_up(server, mail, "alice").user.id
    bob = signed_up(server, mail, "bob").user.id
    clock.advance(minutes=1)
    start = clock.now()
    # Many events in one millisecond (the clock stands still): the id orders them.
    for _ in range(9):
        for user_id in (alice, bob):
            server.stub.UnlockUser(pb.UnlockUserRequest(user_id=user_id))
    clock.advance(minutes=5)
    middle = clock.now()
    for user_id in (alice, bob):
        server.stub.DeactivateUser(pb.DeactivateUserRequest(user_id=user_id))
        server.stub.ReactivateUser(pb.ReactivateUserRequest(user_id=user_id))
    clock.advance(minutes=5)
    end = clock.now()
    everything = audit_events(server.stub)
    ordered = sorted(everything, key=lambda e: (e.event_time.ToDatetime(), e.id), reverse=True)
    assert [e.id for e in everything] == [e.id for e in ordered]

    # Paging 4 at a time while new events arrive: none repeated, none of the earlier ones skipped.
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=4, page_token=token))
        assert len(page.audit_events) <= 4
        pages += 1
        seen += [e.id for e in page.audit_events]
        server.stub.UnlockUser(pb.UnlockUserRequest(user_id=alice))  # newer than every page still to come
        token = page.next_page_token
        if not token:
            break
    assert seen == [e.id for e in everything]

    # Filters, alone and together.
    by_alice = audit_events(server.stub, subject_id=alice)
    assert by_alice
    assert {e.subject_id for e in by_alice} == {alice}
    by_admin = audit_events(server.stub, actor_id=server.admin_id)
    assert {(e.actor.kind, e.actor.id) for e in by_admin} == {(USER, server.admin_id)}
    assert len([e for e in by_admin if e.type == pb.AUDIT_EVENT_TYPE_USER_UNLOCK]) == 18 + pages
    states = [pb.AUDIT_EVENT_TYPE_USER_DEACTIVATE, pb.AUDIT_EVENT_TYPE_USER_REACTIVATE]
    assert {(e.type, e.subject_id) for e in audit_events(server.stub, types=states, subject_id=bob)} == {
        (pb.AUDIT_EVENT_TYPE_USER_DEACTIVATE, bob),
        (pb.AUDIT_EVENT_TYPE_USER_REACTIVATE, bob),
    }
    window = audit_events(server.stub, start_time=timestamp(start), end_time=timestamp(middle))
    assert len(window) == 18
    assert {e.type for e in window} == {pb.AUDIT_EVENT_TYPE_USER_UNLOCK}
    later = audit_events(server.stub, start_time=timestamp(middle), end_time=timestamp(end), subject_id=alice)
    assert [e.type for e in later] == [pb.AUDIT_EVENT_TYPE_USER_REACTIVATE, pb.AUDIT_EVENT_TYPE_USER_DEACTIVATE]
    sign_ins = audit_events(server.stub, types=[pb.AUDIT_EVENT_TYPE_SIGN_IN], end_time=timestamp(start))
    assert {e.subject_id for e in sign_ins} == {server.admin_id, alice, bob}

    # A token works only with its own filters; bad requests name their field.
    first = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=2, subject_id=alice))
    other = pb.ListAuditEventsRequest(page_size=2, subject_id=bob, page_token=first.next_page_token)
    assert violated_fields(rpc_error(server.stub.ListAuditEvents, other)) == {"page_token"}
    bad = {
        "page_size": pb.ListAuditEventsRequest(page_size=1001),
        "subject_id": pb.ListAuditEventsRequest(subject_id="jane"),
        "types": pb.ListAuditEventsRequest(types=[pb.AUDIT_EVENT_TYPE_UNSPECIFIED]),
        "end_time": pb.ListAuditEventsRequest(start_time=timestamp(middle), end_time=timestamp(start)),
        "page_token": pb.ListAuditEventsRequest(page_token="garbage"),
    }
    for field, request in bad.items():
        error = rpc_error(server.stub.ListAuditEvents, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violated_fields(error) == {field}
    unknown_type = pb.ListAuditEventsRequest()
    unknown_type.types.append(pb.AuditEventType.ValueType(999))
    assert violated_fields(rpc_error(server.stub.ListAuditEvents, unknown_type)) == {"types"}


def imported(name: str, role: user_pb2.Role.ValueType, password_hash: str) -> pb.ImportedUser:
    return pb.ImportedUser(
        username=name,
        first_name="Im",
        last_name="Ported",
        email=f"{name}@example.com",
        role=role,
        email_verified=True,
        password_hash=password_hash,
    )


def test_every_grant_of_the_admin_role_names_the_new_admin_and_who_granted_it(
    server: RunningServer, mail: MailSink
) -> None:
    """CreateUser, ImportUsers and SetUserRole: each admin they make is a ROLE_CHANGE event of its
    own, with the new admin as subject and the caller who made them as actor, so one filter of
    the trail finds every admin ever made."""
    admin = (USER, server.admin_id)
    # An admin makes an admin; a plain user's try is refused, and recorded as a try.
    server.stub.CreateUser(create_request(username="cara", email="cara@example.com", role=user_pb2.ROLE_ADMIN))
    cara = server.stub.ListUsers(pb.ListUsersRequest(prefix="cara")).users[0].id
    jane = signed_up(server, mail)
    self_made = create_request(username="mallory", email="mallory@example.com", role=user_pb2.ROLE_ADMIN)
    refused = rpc_error(server.stub_for(jane.access_token).CreateUser, self_made)
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    # An import of an admin, a plain user, and an admin refused (the username is taken).
    password_hash = bcrypt.hashpw(IMPORTED_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    results = server.stub.ImportUsers(
        pb.ImportUsersRequest(
            users=[
                imported("ida", user_pb2.ROLE_ADMIN, password_hash),
                imported("ulf", user_pb2.ROLE_USER, password_hash),
                imported("jane", user_pb2.ROLE_ADMIN, password_hash),
            ]
        )
    ).results
    ida, ulf = results[0].user.id, results[1].user.id
    assert results[2].HasField("error")
    # The imported admin is one indeed: it signs in and lists users.
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="ida", password=IMPORTED_PASSWORD))
    assert server.stub_for(signed_in.access_token).ListUsers(pb.ListUsersRequest()).users
    # A role given by an admin who was made one here: the actor is the caller, not the first admin.
    activation = pb.ActivateUserRequest(identifier="cara", code=mail.code_for("cara@example.com"))
    server.anonymous.ActivateUser(activation)
    cara_session = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="cara", password=PASSWORD))
    cara_stub = server.stub_for(cara_session.access_token)
    cara_stub.SetUserRole(pb.SetUserRoleRequest(user_id=jane.user.id, role=user_pb2.ROLE_ADMIN))

    events = audit_events(server.stub, types=[pb.AUDIT_EVENT_TYPE_ROLE_CHANGE])
    grants = {
        (e.actor.kind, e.actor.id, e.subject_id, e.note)
        for e in events
        if e.status_code == OK and e.note.startswith("role ROLE_ADMIN")
    }
    assert grants == {
        (*admin, cara, "role ROLE_ADMIN, at creation"),
        (*admin, ida, "role ROLE_ADMIN, imported"),
        (USER, cara, jane.user.id, "role ROLE_ADMIN"),
    }
    # The refused try names its caller (no subject: nobody was made).
    assert has(
        events,
        pb.AUDIT_EVENT_TYPE_ROLE_CHANGE,
        actor=(USER, jane.user.id),
        subject="",
        status=grpc.StatusCode.PERMISSION_DENIED.value[0],
        reason="role ROLE_ADMIN, at creation",
    )
    assert len(events) == 4
    # The import's own event still counts the batch; the plain user and a plain registration
    # (jane's, anonymous) are no role events.
    everything = audit_events(server.stub)
    assert has(everything, pb.AUDIT_EVENT_TYPE_USERS_IMPORT, actor=admin, subject="", reason="created 2, refused 1")
    assert not [e for e in everything if e.subject_id == ulf]
    assert not [e for e in everything if e.type == pb.AUDIT_EVENT_TYPE_ROLE_CHANGE and e.actor.kind == ANONYMOUS]


def test_only_admins_read_the_trail(server: RunningServer, mail: MailSink) -> None:
    alice = signed_up(server, mail, "alice")
    created = server.stub.CreateServiceAccount(pb.CreateServiceAccountRequest(name="reporting"))
    issued = server.anonymous.IssueServiceToken(
        pb.IssueServiceTokenRequest(client_id=created.service_account.client_id, client_secret=created.client_secret)
    )
    request = pb.ListAuditEventsRequest(subject_id=alice.user.id)
    assert rpc_error(server.anonymous.ListAuditEvents, request).code() == grpc.StatusCode.UNAUTHENTICATED
    for token in (alice.access_token, issued.access_token):
        assert rpc_error(server.stub_for(token).ListAuditEvents, request).code() == grpc.StatusCode.PERMISSION_DENIED
    assert server.stub.ListAuditEvents(request).audit_events


def test_housekeeping_purges_events_past_the_retention(start_server: StartServer, clock: FakeClock) -> None:
    server = start_server(clock=clock, audit_retention_days=30, housekeeping_interval_seconds=3600)
    server.stub.UnlockUser(pb.UnlockUserRequest(user_id=server.admin_id))
    before = len(stored_audit(server))
    assert before >= 2  # the admin's sign-in and the unlock
    clock.advance(days=29)
    first = server.call(server.app.services.housekeeping.run_once())
    assert first is not None
    assert first.audit_events == 0
    clock.advance(days=2)
    signed_in = server.anonymous.Authenticate(
        pb.AuthenticateRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
    )
    purged = server.call(server.app.services.housekeeping.run_once())
    assert purged is not None
    assert purged.audit_events == before
    left = audit_events(server.stub_for(signed_in.access_token))
    assert [e.type for e in left] == [pb.AUDIT_EVENT_TYPE_SIGN_IN]


def test_a_failed_audit_write_never_fails_the_call(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    # A unique index on the event type makes the second event of a type fail to insert.
    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri)
    with client:
        client[server.settings.mongodb_database].audit_events.create_index("type", unique=True, name="one_of_a_kind")
    for _ in range(2):
        assert server.stub.UnlockUser(pb.UnlockUserRequest(user_id=server.admin_id)).user.id == server.admin_id
    assert len(audit_events(server.stub, types=[pb.AUDIT_EVENT_TYPE_USER_UNLOCK])) == 1
    lost = [r for r in caplog.records if r.getMessage() == "audit event not recorded"]
    assert [getattr(r, "audit_type", None) for r in lost] == ["user_unlock"]
    assert server.admin_token not in caplog.text
