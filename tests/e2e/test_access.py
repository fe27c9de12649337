"""Every RPC of the service, called with no token, another user's token, the user's own and an
admin's: each gets what its row in the access table promises. A refused call is refused by the
access rules (their reason, not the service's); an admitted call reaches the service and gets
the answer listed here for its sample request, success or a refusal of the service's own. Walks
the service descriptor, so a new RPC cannot slip in unguarded.

One server and one pair of users serve every case (module scope): no sample request changes
them, but the one that ends a user's tokens, which gets a user of its own."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.support.calls import PASSWORD, create_request, error_info, signed_up
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, make_settings
from users.v1 import group_pb2 as gpb
from users.v1 import metadata_pb2, user_pb2
from users.v1 import passkey_pb2 as pk
from users.v1 import service_account_token_pb2 as tpb
from users.v1 import user_service_pb2 as pb
from users_grpc.grpc_api.access import RULES, Rule

METHODS = [method.name for method in pb.DESCRIPTOR.services_by_name["UserService"].methods]
CALLERS = ["anonymous", "another user", "the user", "an admin"]
# What the access rules answer when they refuse: the status and the ErrorInfo reason.
DENIALS = {"anonymous": "UNAUTHENTICATED/UNAUTHENTICATED"} | {
    caller: "PERMISSION_DENIED/PERMISSION_DENIED" for caller in CALLERS[1:]
}

# One request per RPC about the user with this id and name. Requests to public RPCs are
# ones the service itself refuses (so they change nothing) with a status that is not a denial.
REQUESTS: dict[str, Callable[[str, str], Any]] = {
    "CreateUser": lambda _id, _name: create_request(username="", email="walker@example.com"),
    "ActivateUser": lambda _id, name: pb.ActivateUserRequest(identifier=name, code="x"),
    "ResendActivationCode": lambda _id, name: pb.ResendActivationCodeRequest(identifier=name),
    "GetUser": lambda id_, _name: pb.GetUserRequest(id=id_),
    "GetUserByIdentifier": lambda _id, name: pb.GetUserByIdentifierRequest(identifier=name),
    "DeleteUser": lambda id_, _name: pb.DeleteUserRequest(id="f" * 24),
    "DeleteUserByIdentifier": lambda _id, _name: pb.DeleteUserByIdentifierRequest(identifier="nobody"),
    "VerifyCredentials": lambda _id, name: pb.VerifyCredentialsRequest(identifier=name, password=PASSWORD),
    "Authenticate": lambda _id, name: pb.AuthenticateRequest(identifier=name, password=""),
    "RefreshSession": lambda _id, _name: pb.RefreshSessionRequest(refresh_token=""),
    "RevokeSession": lambda _id, _name: pb.RevokeSessionRequest(refresh_token=""),
    "ListSessions": lambda id_, _name: pb.ListSessionsRequest(user_id=id_),
    "RevokeAllSessions": lambda id_, _name: pb.RevokeAllSessionsRequest(user_id="f" * 24),
    "GetPublicKeys": lambda _id, _name: pb.GetPublicKeysRequest(),
    "ValidateToken": lambda _id, _name: pb.ValidateTokenRequest(access_token=""),
    "ForgotPassword": lambda _id, name: pb.ForgotPasswordRequest(identifier="nobody"),
    "ResetPassword": lambda _id, _name: pb.ResetPasswordRequest(token=""),
    "ChangePassword": lambda id_, _name: pb.ChangePasswordRequest(
        user_id=id_, current_password=PASSWORD, new_password="short", new_password_confirmation="short"
    ),
    "EnableMfa": lambda id_, _name: pb.EnableMfaRequest(user_id=id_, password=PASSWORD),
    "GetMfaQrCode": lambda id_, _name: pb.GetMfaQrCodeRequest(user_id=id_),
    "ConfirmMfa": lambda id_, _name: pb.ConfirmMfaRequest(user_id=id_, code="x"),
    "DisableMfa": lambda id_, _name: pb.DisableMfaRequest(user_id=id_, password="", code="x"),
    "RegenerateRecoveryCodes": lambda id_, _name: pb.RegenerateRecoveryCodesRequest(user_id=id_, code=""),
    "ChangeEmail": lambda id_, _name: pb.ChangeEmailRequest(user_id=id_, new_email="", password=PASSWORD),
    "ConfirmEmailChange": lambda id_, _name: pb.ConfirmEmailChangeRequest(user_id=id_, code="x"),
    "SetUserEmail": lambda id_, _name: pb.SetUserEmailRequest(user_id=id_, email=""),
    # The admin actions name a user who does not exist: they change nothing.
    "SetUserRole": lambda _id, _name: pb.SetUserRoleRequest(user_id="f" * 24, role=user_pb2.ROLE_ADMIN),
    "DeactivateUser": lambda _id, _name: pb.DeactivateUserRequest(user_id="f" * 24),
    "ReactivateUser": lambda _id, _name: pb.ReactivateUserRequest(user_id="f" * 24),
    "LockUser": lambda _id, _name: pb.LockUserRequest(user_id="f" * 24),
    "UnlockUser": lambda _id, _name: pb.UnlockUserRequest(user_id="f" * 24),
    "ResetUserMfa": lambda _id, _name: pb.ResetUserMfaRequest(user_id="f" * 24),
    "ImportUsers": lambda _id, _name: pb.ImportUsersRequest(),
    "CreateServiceAccount": lambda _id, _name: pb.CreateServiceAccountRequest(name=""),
    "IssueServiceToken": lambda _id, _name: pb.IssueServiceTokenRequest(client_id=""),
    "ListServiceAccounts": lambda _id, _name: pb.ListServiceAccountsRequest(),
    "DeleteServiceAccount": lambda _id, _name: pb.DeleteServiceAccountRequest(client_id="f" * 24),
    "ListUsers": lambda _id, _name: pb.ListUsersRequest(page_size=1),
    # No update_mask: refused as INVALID_ARGUMENT once admitted, so it changes nothing.
    "UpdateUser": lambda id_, _name: pb.UpdateUserRequest(user_id=id_),
    "ListAuditEvents": lambda _id, _name: pb.ListAuditEventsRequest(page_size=1),
    # Not a cursor: refused as INVALID_ARGUMENT once admitted, so the stream ends at once.
    "WatchUserChanges": lambda _id, _name: pb.WatchUserChangesRequest(after="not a cursor"),
    # The self scope, which the user may reach too; no key (refused), or one nobody set.
    "SetUserMetadata": lambda id_, _name: metadata_pb2.SetUserMetadataRequest(
        user_id=id_, scope=metadata_pb2.METADATA_SCOPE_SELF, key=""
    ),
    "GetUserMetadata": lambda id_, _name: metadata_pb2.GetUserMetadataRequest(
        user_id=id_, scope=metadata_pb2.METADATA_SCOPE_SELF, key="unset"
    ),
    "ListUserMetadata": lambda id_, _name: metadata_pb2.ListUserMetadataRequest(user_id=id_),
    "DeleteUserMetadata": lambda id_, _name: metadata_pb2.DeleteUserMetadataRequest(
        user_id=id_, scope=metadata_pb2.METADATA_SCOPE_SELF, key="unset"
    ),
    # Groups: writes name no valid group or none at all, so they change nothing.
    "CreateGroup": lambda _id, _name: gpb.CreateGroupRequest(name=""),
    "RenameGroup": lambda _id, _name: gpb.RenameGroupRequest(group_id="f" * 24, name="x"),
    "DeleteGroup": lambda _id, _name: gpb.DeleteGroupRequest(group_id="f" * 24),
    "ListGroups": lambda _id, _name: gpb.ListGroupsRequest(page_size=1),
    "AddGroupMember": lambda id_, _name: gpb.AddGroupMemberRequest(group_id="f" * 24, user_id=id_),
    "RemoveGroupMember": lambda id_, _name: gpb.RemoveGroupMemberRequest(group_id="f" * 24, user_id=id_),
    "ListGroupMembers": lambda _id, _name: gpb.ListGroupMembersRequest(group_id="f" * 24),
    "ListUserGroups": lambda id_, _name: gpb.ListUserGroupsRequest(user_id=id_),
    # A registration started and never finished changes nothing the account shows.
    "StartPasskeyRegistration": lambda id_, _name: pk.StartPasskeyRegistrationRequest(user_id=id_, password=PASSWORD),
    "FinishPasskeyRegistration": lambda id_, _name: pk.FinishPasskeyRegistrationRequest(user_id=id_),
    "StartPasskeySignIn": lambda _id, name: pk.StartPasskeySignInRequest(identifier=name),
    "FinishPasskeySignIn": lambda _id, _name: pk.FinishPasskeySignInRequest(),
    "ListAuthenticationFactors": lambda id_, _name: pk.ListAuthenticationFactorsRequest(user_id=id_),
    "RenamePasskey": lambda id_, _name: pk.RenamePasskeyRequest(user_id=id_, passkey_id="f" * 24, display_name="x"),
    "RemovePasskey": lambda id_, _name: pk.RemovePasskeyRequest(user_id=id_, passkey_id="f" * 24, password=PASSWORD),
    "ListUserAuthenticationFactors": lambda id_, _name: pk.ListUserAuthenticationFactorsRequest(user_id=id_),
    "RemoveUserPasskey": lambda _id, _name: pk.RemoveUserPasskeyRequest(user_id="f" * 24, passkey_id="f" * 24),
    "SetPassword": lambda _id, _name: pb.SetPasswordRequest(user_id="f" * 24),
    "CreateServiceAccountToken": lambda _id, _name: tpb.CreateServiceAccountTokenRequest(
        service_account_id="f" * 24, display_name="x"
    ),
    "ListServiceAccountTokens": lambda _id, _name: tpb.ListServiceAccountTokensRequest(service_account_id="f" * 24),
    "RevokeServiceAccountToken": lambda _id, _name: tpb.RevokeServiceAccountTokenRequest(
        service_account_id="f" * 24, token_id="f" * 24
    ),
}
# DeleteUser and RevokeAllSessions name a user who does not exist, so that "self" calls are about
# someone else; the self case below uses the caller's own id for them (RevokeAllSessions on a user
# of its own: it succeeds, and ends that user's tokens).
SELF_REQUESTS: dict[str, Callable[[str, str], Any]] = {
    **REQUESTS,
    # No password: refused as INVALID_ARGUMENT once admitted, so the shared user lives on.
    "DeleteUser": lambda id_, _name: pb.DeleteUserRequest(id=id_, password=""),
    "RevokeAllSessions": lambda id_, _name: pb.RevokeAllSessionsRequest(user_id=id_),
}


INVALID = "INVALID_ARGUMENT/INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND/USER_NOT_FOUND"
# What each admitted sample request gets from the service: "OK", or "<status>/<ErrorInfo reason>".
ADMITTED: dict[str, str] = {
    "CreateUser": INVALID,
    "ActivateUser": INVALID,
    "ResendActivationCode": "OK",
    "GetUser": "OK",
    "GetUserByIdentifier": "OK",
    "DeleteUser": NOT_FOUND,
    "DeleteUserByIdentifier": NOT_FOUND,
    "VerifyCredentials": "OK",
    "Authenticate": INVALID,
    "RefreshSession": INVALID,
    "RevokeSession": INVALID,
    "ListSessions": "OK",
    "RevokeAllSessions": "OK",
    "GetPublicKeys": "OK",
    "ValidateToken": INVALID,
    "ForgotPassword": "OK",
    "ResetPassword": "INVALID_ARGUMENT/INVALID_RESET_TOKEN",
    "ChangePassword": INVALID,
    "EnableMfa": "OK",
    "GetMfaQrCode": "OK",
    "ConfirmMfa": INVALID,
    "DisableMfa": INVALID,
    "RegenerateRecoveryCodes": INVALID,
    "ChangeEmail": INVALID,
    "ConfirmEmailChange": INVALID,
    "SetUserEmail": INVALID,
    "SetUserRole": NOT_FOUND,
    "DeactivateUser": NOT_FOUND,
    "ReactivateUser": NOT_FOUND,
    "LockUser": NOT_FOUND,
    "UnlockUser": NOT_FOUND,
    "ResetUserMfa": NOT_FOUND,
    "ImportUsers": "OK",
    "CreateServiceAccount": INVALID,
    "IssueServiceToken": INVALID,
    "ListServiceAccounts": "OK",
    "DeleteServiceAccount": "NOT_FOUND/SERVICE_ACCOUNT_NOT_FOUND",
    "ListUsers": "OK",
    "UpdateUser": INVALID,
    "ListAuditEvents": "OK",
    "WatchUserChanges": INVALID,  # the sample request's cursor is none of this feed
    "SetUserMetadata": INVALID,
    "GetUserMetadata": "NOT_FOUND/METADATA_NOT_FOUND",
    "ListUserMetadata": "OK",
    "DeleteUserMetadata": "NOT_FOUND/METADATA_NOT_FOUND",
    "CreateGroup": INVALID,
    "RenameGroup": "NOT_FOUND/GROUP_NOT_FOUND",
    "DeleteGroup": "NOT_FOUND/GROUP_NOT_FOUND",
    "ListGroups": "OK",
    "AddGroupMember": "NOT_FOUND/GROUP_NOT_FOUND",
    "RemoveGroupMember": "NOT_FOUND/GROUP_NOT_FOUND",
    "ListGroupMembers": "NOT_FOUND/GROUP_NOT_FOUND",
    "ListUserGroups": "OK",
    "StartPasskeyRegistration": "OK",  # a ceremony started, never finished
    "FinishPasskeyRegistration": INVALID,
    "StartPasskeySignIn": "OK",
    "FinishPasskeySignIn": INVALID,
    "ListAuthenticationFactors": "OK",
    "RenamePasskey": "NOT_FOUND/PASSKEY_NOT_FOUND",
    "RemovePasskey": "NOT_FOUND/PASSKEY_NOT_FOUND",
    "ListUserAuthenticationFactors": "OK",
    "RemoveUserPasskey": NOT_FOUND,
    "SetPassword": NOT_FOUND,
    "CreateServiceAccountToken": "NOT_FOUND/SERVICE_ACCOUNT_NOT_FOUND",
    "ListServiceAccountTokens": "NOT_FOUND/SERVICE_ACCOUNT_NOT_FOUND",
    "RevokeServiceAccountToken": "NOT_FOUND/SERVICE_ACCOUNT_TOKEN_NOT_FOUND",
}
# Where a caller's admitted call gets another answer than ADMITTED's.
ADMITTED_FOR: dict[tuple[str, str], str] = {
    ("DeleteUser", "the user"): INVALID,  # one's own account, without the password it takes
}


def test_every_rpc_has_an_access_rule_a_sample_request_and_an_expected_answer() -> None:
    assert set(RULES) == set(METHODS)
    assert set(REQUESTS) == set(METHODS)
    assert set(ADMITTED) == set(METHODS)
    assert all(admitted(RULES[method], caller) for method, caller in ADMITTED_FOR)


def admitted(rule: Rule, caller: str) -> bool:
    """Whether the access rules let ``caller`` make a call about the user (``alice``)."""
    if caller in {"anonymous", "another user"}:
        return rule is Rule.ANYONE
    if caller == "the user":
        self_rules = {Rule.SELF, Rule.SELF_OR_ADMIN, Rule.SELF_ADMIN_OR_MACHINE, Rule.SELF_ADMIN_OR_PROVISIONER}
        return rule is Rule.ANYONE or rule in self_rules
    return rule is not Rule.SELF  # an admin: passwords and second factors are the user's own business


def answer(stub: Any, method: str, request: Any) -> str:
    """ "OK", or the status and ErrorInfo reason of the refusal."""
    try:
        result = getattr(stub, method)(request, timeout=30)
        if isinstance(result, Iterator):  # a server stream: its status comes with its end
            list(result)
    except grpc.RpcError as error:
        return f"{error.code().name}/{error_info(error).reason}"
    return "OK"


@dataclass
class World:
    server: RunningServer
    mail: MailSink
    alice: pb.AuthenticateResponse
    bob: pb.AuthenticateResponse


@pytest.fixture(scope="module")
def world(mongodb_uri: str, smtp_server: tuple[MailSink, int]) -> Iterator[World]:
    sink, port = smtp_server
    sink.clear()
    server = RunningServer(make_settings(mongodb_uri, f"test_{uuid.uuid4().hex[:16]}", port), clock=None)
    try:
        alice, bob = signed_up(server, sink, "alice"), signed_up(server, sink, "bob")
        # A pending enrollment, so that GetMfaQrCode has one to show whatever ran before it.
        server.stub_for(alice.access_token).EnableMfa(pb.EnableMfaRequest(user_id=alice.user.id, password=PASSWORD))
        yield World(server, sink, alice, bob)
    finally:
        server.stop()


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("method", METHODS)
def test_access(world: World, method: str, caller: str) -> None:
    server, alice = world.server, world.alice
    requests = SELF_REQUESTS if caller == "the user" else REQUESTS
    subject = alice
    if (method, caller) == ("RevokeAllSessions", "the user"):
        subject = signed_up(server, world.mail, "carol")  # it ends the caller's tokens
    stub = {
        "anonymous": server.anonymous,
        "another user": server.stub_for(world.bob.access_token),
        "the user": server.stub_for(subject.access_token),
        "an admin": server.stub,
    }[caller]
    got = answer(stub, method, requests[method](subject.user.id, subject.user.username))
    if not admitted(RULES[method], caller):
        assert got == DENIALS[caller]
    else:
        assert got == ADMITTED_FOR.get((method, caller), ADMITTED[method])
        assert got not in DENIALS.values()
