"""Service accounts through a real channel and database: created by an admin, traded for a token
that counts as a machine caller, refused where machines are not admitted, dead once deleted."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import jwt
import pytest
from pymongo import MongoClient

from tests.support.calls import (
    PASSWORD,
    create_service_account,
    error_info,
    issue_service_token,
    rpc_error,
    signed_up,
    violated_fields,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb


def stored_service_accounts(server: RunningServer) -> list[dict[str, Any]]:
    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri)
    with client:
        return list(client[server.settings.mongodb_database].service_accounts.find())


def test_a_service_token_is_a_machine_caller(server: RunningServer, mail: MailSink) -> None:
    alice = signed_up(server, mail, "alice")
    created = create_service_account(server, "billing")
    issued = issue_service_token(server, created.service_account.client_id, created.client_secret)
    machine = server.stub_for(issued.access_token)

    # Admitted where machine callers are.
    assert machine.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier="alice")).user.id == alice.user.id
    assert machine.GetUser(pb.GetUserRequest(id=alice.user.id)).user.username == "alice"
    verified = machine.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="alice", password=PASSWORD))
    assert verified.user.id == alice.user.id
    claims = machine.ValidateToken(pb.ValidateTokenRequest(access_token=alice.access_token)).claims
    assert claims.subject == alice.user.id

    # Refused where only admins (or the user themself) are.
    refused = {
        "ListServiceAccounts": pb.ListServiceAccountsRequest(),
        "CreateServiceAccount": pb.CreateServiceAccountRequest(name="another"),
        "DeleteServiceAccount": pb.DeleteServiceAccountRequest(client_id=created.service_account.client_id),
        "ImportUsers": pb.ImportUsersRequest(),
        "DeleteUserByIdentifier": pb.DeleteUserByIdentifierRequest(identifier="alice"),
        "DeleteUser": pb.DeleteUserRequest(id=alice.user.id),
        "ListSessions": pb.ListSessionsRequest(user_id=alice.user.id),
    }
    for method, request in refused.items():
        assert rpc_error(getattr(machine, method), request).code() == grpc.StatusCode.PERMISSION_DENIED, method

    # Never taken for a user's token, where one is asked for.
    not_a_user = rpc_error(server.stub.ValidateToken, pb.ValidateTokenRequest(access_token=issued.access_token))
    assert not_a_user.code() == grpc.StatusCode.UNAUTHENTICATED

    # Deleting the account kills its token at once, and its secret.
    server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=created.service_account.client_id))
    gone = rpc_error(machine.GetUserByIdentifier, pb.GetUserByIdentifierRequest(identifier="alice"))
    assert gone.code() == grpc.StatusCode.UNAUTHENTICATED
    dead_secret = rpc_error(
        server.anonymous.IssueServiceToken,
        pb.IssueServiceTokenRequest(client_id=created.service_account.client_id, client_secret=created.client_secret),
    )
    assert dead_secret.code() == grpc.StatusCode.UNAUTHENTICATED
    again = rpc_error(
        server.stub.DeleteServiceAccount, pb.DeleteServiceAccountRequest(client_id=created.service_account.client_id)
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND


def test_the_secret_is_shown_once_and_never_stored_or_listed(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    created = create_service_account(server, "reports")
    secret = created.client_secret
    assert len(secret) == 43  # 256 random bits, URL-safe base64
    (document,) = stored_service_accounts(server)
    assert str(document["_id"]) == created.service_account.client_id
    assert secret not in repr(document)
    assert document["secret_digest"] != secret

    listed = server.stub.ListServiceAccounts(pb.ListServiceAccountsRequest())
    assert [a.name for a in listed.service_accounts] == ["reports"]
    assert secret.encode() not in listed.SerializeToString()
    issue_service_token(server, created.service_account.client_id, secret)
    assert "service token issued" in caplog.text
    assert secret not in caplog.text


def test_wrong_secrets_are_refused_alike_and_throttled(start_server: StartServer) -> None:
    server = start_server(password_free_attempts=3, clock=FakeClock())  # no hold ends between calls
    created = create_service_account(server, "payments")
    client_id = created.service_account.client_id
    wrong = rpc_error(
        server.anonymous.IssueServiceToken, pb.IssueServiceTokenRequest(client_id=client_id, client_secret="nope")
    )
    unknown = rpc_error(
        server.anonymous.IssueServiceToken,
        pb.IssueServiceTokenRequest(client_id="f" * 24, client_secret=created.client_secret),
    )
    assert (wrong.code(), wrong.details()) == (unknown.code(), unknown.details())
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED

    codes = []
    for _ in range(4):
        error = rpc_error(
            server.anonymous.IssueServiceToken, pb.IssueServiceTokenRequest(client_id=client_id, client_secret="nope")
        )
        codes.append(error.code())
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error).reason == "TOO_MANY_ATTEMPTS"
    # While throttled, the right secret waits too: guessing gains nothing by ending on it.
    held = rpc_error(
        server.anonymous.IssueServiceToken,
        pb.IssueServiceTokenRequest(client_id=client_id, client_secret=created.client_secret),
    )
    assert held.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_names_are_checked_and_unique_and_lists_page(server: RunningServer) -> None:
    bad = rpc_error(server.stub.CreateServiceAccount, pb.CreateServiceAccountRequest(name="Not OK!"))
    assert violated_fields(bad) == {"name"}
    names = ["alpha", "bravo", "charlie"]
    for name in names:
        create_service_account(server, name)
    taken = rpc_error(server.stub.CreateServiceAccount, pb.CreateServiceAccountRequest(name="bravo"))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(taken).metadata["field"] == "name"

    first = server.stub.ListServiceAccounts(pb.ListServiceAccountsRequest(page_size=2))
    assert first.next_page_token
    second = server.stub.ListServiceAccounts(
        pb.ListServiceAccountsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [a.name for a in [*first.service_accounts, *second.service_accounts]] == names
    assert second.next_page_token == ""
    for request in (pb.ListServiceAccountsRequest(page_size=1001), pb.ListServiceAccountsRequest(page_token="junk")):
        assert rpc_error(server.stub.ListServiceAccounts, request).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_local_verifier_never_takes_a_service_token_for_a_users(server: RunningServer) -> None:
    """A service verifying user tokens from the key set (ES256, iss and aud pinned, as the README
    says) refuses a service account's token: it is for another audience."""
    created = create_service_account(server, "mesh")
    token = issue_service_token(server, created.service_account.client_id, created.client_secret).access_token
    keys = jwt.PyJWKSet.from_json(server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json)
    key = next(k for k in keys.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key.key, algorithms=["ES256"], audience="users-grpc", issuer="users-grpc")


def test_permissions_are_kept_listed_and_checked(server: RunningServer) -> None:
    provisioning = pb.SERVICE_ACCOUNT_PERMISSION_PROVISION_USERS
    created = create_service_account(server, "okta-provisioning", [provisioning])
    assert list(created.service_account.permissions) == [provisioning]
    listed = server.stub.ListServiceAccounts(pb.ListServiceAccountsRequest()).service_accounts
    assert [list(account.permissions) for account in listed if account.name == "okta-provisioning"] == [[provisioning]]
    [stored] = [account for account in stored_service_accounts(server) if account["name"] == "okta-provisioning"]
    assert stored["permissions"] == ["provision_users"]
    token = issue_service_token(server, created.service_account.client_id, created.client_secret).access_token
    assert server.stub_for(token).ListUsers(pb.ListUsersRequest(page_size=1)).users

    none = [pb.SERVICE_ACCOUNT_PERMISSION_UNSPECIFIED]
    unspecified = pb.CreateServiceAccountRequest(name="nothing", permissions=none)
    assert violated_fields(rpc_error(server.stub.CreateServiceAccount, unspecified)) == {"permissions"}
    # A deleted account's token grants nothing, permission or not.
    server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=created.service_account.client_id))
    error = rpc_error(server.stub_for(token).ListUsers, pb.ListUsersRequest(page_size=1))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
