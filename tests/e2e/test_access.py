"""Every RPC of the service, called with no token, another user's token and the user's own:
each gets what its row in the access table promises. Walks the service descriptor, so a
new RPC cannot slip in unguarded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from tests.conftest import MailSink, RunningServer
from tests.e2e.helpers import PASSWORD, create_request
from tests.e2e.test_sessions import signed_up
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.access import RULES, Rule

METHODS = [method.name for method in pb.DESCRIPTOR.services_by_name["UserService"].methods]
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}

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
    # Not a cursor: refused as INVALID_ARGUMENT once admitted, so the stream ends at once.
    "WatchUserChanges": lambda _id, _name: pb.WatchUserChangesRequest(after="not a cursor"),
}
# DeleteUser and RevokeAllSessions name a user who does not exist, so that "self" calls are about
# someone else; the self case below uses the caller's own id for them.
SELF_REQUESTS: dict[str, Callable[[str, str], Any]] = {
    **REQUESTS,
    "DeleteUser": lambda id_, _name: pb.DeleteUserRequest(id=id_, password=PASSWORD),
    "RevokeAllSessions": lambda id_, _name: pb.RevokeAllSessionsRequest(user_id=id_),
}


def test_every_rpc_has_an_access_rule_and_a_sample_request() -> None:
    assert set(RULES) == set(METHODS)
    assert set(REQUESTS) == set(METHODS)


def call(stub: Any, method: str, request: Any) -> grpc.StatusCode:
    try:
        result = getattr(stub, method)(request)
        if isinstance(result, Iterator):  # a server stream: its status comes with its end
            list(result)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


@pytest.fixture
def users(server: RunningServer, mail: MailSink) -> tuple[pb.AuthenticateResponse, pb.AuthenticateResponse]:
    return signed_up(server, mail, "alice"), signed_up(server, mail, "bob")


@pytest.mark.parametrize("method", METHODS)
def test_without_a_token(server: RunningServer, users: Any, method: str) -> None:
    alice, _ = users
    code = call(server.anonymous, method, REQUESTS[method](alice.user.id, "alice"))
    if RULES[method] is Rule.ANYONE:
        assert code not in DENIED
    else:
        assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", METHODS)
def test_with_another_users_token(server: RunningServer, users: Any, method: str) -> None:
    alice, bob = users
    code = call(server.stub_for(bob.access_token), method, REQUESTS[method](alice.user.id, "alice"))
    if RULES[method] is Rule.ANYONE:
        assert code not in DENIED
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("method", METHODS)
def test_with_the_users_own_token(server: RunningServer, users: Any, method: str) -> None:
    alice, _ = users
    code = call(server.stub_for(alice.access_token), method, SELF_REQUESTS[method](alice.user.id, "alice"))
    if RULES[method] in {Rule.ANYONE, Rule.SELF, Rule.SELF_OR_ADMIN, Rule.SELF_ADMIN_OR_MACHINE}:
        assert code not in DENIED
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("method", METHODS)
def test_with_an_admin_token(server: RunningServer, users: Any, method: str) -> None:
    alice, _ = users
    code = call(server.stub, method, REQUESTS[method](alice.user.id, "alice"))
    if RULES[method] is Rule.SELF:
        # Passwords and second factors are the user's own business, even for admins.
        assert code == grpc.StatusCode.PERMISSION_DENIED
    else:
        assert code not in DENIED
