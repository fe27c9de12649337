"""Service-account tokens (``usat_...``) through a real server, channel, HTTP edge and database:
made by an admin, taken as the account's machine caller over gRPC, Connect and SCIM, listed
without their secret, dead on revocation, expiry and the account's deletion, and refused alike
whatever was wrong with them."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx2
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pymongo import MongoClient

from tests.support.calls import create_service_account, error_info, rpc_error, violated_fields
from tests.support.fakes import FakeClock
from tests.support.servers import RunningServer, StartServer
from users.v1 import service_account_token_pb2 as tpb
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb

PROVISION = pb.SERVICE_ACCOUNT_PERMISSION_PROVISION_USERS
TOKEN_FORMAT = re.compile(r"usat_([0-9a-f]{24})_([0-9a-f]{24})_[A-Za-z0-9_-]{43}")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def clock() -> FakeClock:
    # Whole seconds: the database keeps milliseconds, and the test compares times it read back.
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


def token_request(
    client_id: str, name: str = "okta-scim", expire_time: Timestamp | None = None
) -> tpb.CreateServiceAccountTokenRequest:
    request = tpb.CreateServiceAccountTokenRequest(service_account_id=client_id, display_name=name)
    if expire_time is not None:
        request.expire_time.CopyFrom(expire_time)
    return request


def make_token(server: RunningServer, client_id: str, *args: Any) -> tpb.CreateServiceAccountTokenResponse:
    return server.stub.CreateServiceAccountToken(token_request(client_id, *args))


def listed(server: RunningServer, client_id: str) -> list[tpb.ServiceAccountToken]:
    request = tpb.ListServiceAccountTokensRequest(service_account_id=client_id)
    return list(server.stub.ListServiceAccountTokens(request).service_account_tokens)


def stored_account(server: RunningServer, client_id: str) -> dict[str, Any] | None:
    from bson import ObjectId

    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri)
    with client:
        return client[server.settings.mongodb_database].service_accounts.find_one({"_id": ObjectId(client_id)})


def scim_status(server: RunningServer, token: str) -> int:
    base_url = f"http://127.0.0.1:{server.app.http_port}/scim/v2"
    with httpx2.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as scim:
        return scim.get("/Users", params={"filter": 'userName eq "alice"'}).status_code


def connect_json(server: RunningServer, method: str, body: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
    """A Connect unary call in JSON (as curl makes it) on the HTTP edge."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{server.app.http_port}/users.v1.UserService/{method}"
    sent = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(sent, timeout=30) as answer:  # noqa: S310 - the test's own server
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def refusal(server: RunningServer, token: str) -> tuple[grpc.StatusCode, str, str]:
    """What a gRPC call with ``token`` is refused with: code, message and ErrorInfo reason."""
    error = rpc_error(server.stub_for(token).GetUserByIdentifier, pb.GetUserByIdentifierRequest(identifier="alice"))
    return error.code(), error.details() or "", error_info(error).reason


def test_a_token_works_on_every_edge_until_revoked(start_server: StartServer) -> None:
    server = start_server(http_address="127.0.0.1:0")
    admin, admin_name = server.admin_id, server.admin_username
    account = create_service_account(server, "okta", [PROVISION]).service_account
    created = make_token(server, account.client_id)
    token = created.token
    record = created.service_account_token
    assert TOKEN_FORMAT.fullmatch(token)
    assert TOKEN_FORMAT.fullmatch(token).groups() == (account.client_id, record.id)  # type: ignore[union-attr]
    assert (record.service_account_id, record.display_name) == (account.client_id, "okta-scim")
    assert not record.HasField("last_use_time")
    secret = token[-43:]

    # gRPC: the account's machine caller, with its provisioning permission.
    machine = server.stub_for(token)
    assert machine.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=admin_name)).user.id == admin
    assert [u.id for u in machine.ListUsers(pb.ListUsersRequest(prefix=admin_name)).users] == [admin]
    # Connect (JSON over HTTP) and SCIM, on the HTTP edge.
    status, answer = connect_json(server, "ListUsers", {"prefix": admin_name}, token)
    assert (status, [u["id"] for u in answer["users"]]) == (200, [admin])
    assert scim_status(server, token) == 200
    # Still no admin: the access table rules it as it rules the account's IssueServiceToken tokens.
    denied = rpc_error(machine.DeactivateUser, pb.DeactivateUserRequest(user_id=admin))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_error(machine.ListServiceAccounts, pb.ListServiceAccountsRequest()).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert server.stub.GetUser(pb.GetUserRequest(id=admin)).user.state == user_pb2.USER_STATE_ACTIVE

    # Listed with its metadata (and its use), never the token nor its secret; stored only as a digest.
    listing = server.stub.ListServiceAccountTokens(
        tpb.ListServiceAccountTokensRequest(service_account_id=account.client_id)
    )
    assert [(t.id, t.display_name) for t in listing.service_account_tokens] == [(record.id, "okta-scim")]
    assert listing.service_account_tokens[0].HasField("last_use_time")
    assert listing.service_account_tokens[0].expire_time == record.expire_time
    assert secret.encode() not in listing.SerializeToString()
    stored = repr(stored_account(server, account.client_id))
    assert secret not in stored
    assert token not in stored

    # Revoked: refused at once on every edge.
    server.stub.RevokeServiceAccountToken(
        tpb.RevokeServiceAccountTokenRequest(service_account_id=account.client_id, token_id=record.id)
    )
    assert refusal(server, token)[0] == UNAUTHENTICATED
    assert connect_json(server, "ListUsers", {}, token)[1]["code"] == "unauthenticated"
    assert scim_status(server, token) == 401
    again = rpc_error(
        server.stub.RevokeServiceAccountToken,
        tpb.RevokeServiceAccountTokenRequest(service_account_id=account.client_id, token_id=record.id),
    )
    assert (again.code(), error_info(again).reason) == (grpc.StatusCode.NOT_FOUND, "SERVICE_ACCOUNT_TOKEN_NOT_FOUND")
    assert listed(server, account.client_id) == []

    # Deleting the account ends its other tokens, on every edge, and its list.
    kept = make_token(server, account.client_id, "entra").token
    assert scim_status(server, kept) == 200
    server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=account.client_id))
    assert refusal(server, kept)[0] == UNAUTHENTICATED
    assert scim_status(server, kept) == 401
    gone = rpc_error(
        server.stub.ListServiceAccountTokens, tpb.ListServiceAccountTokensRequest(service_account_id=account.client_id)
    )
    assert (gone.code(), error_info(gone).reason) == (grpc.StatusCode.NOT_FOUND, "SERVICE_ACCOUNT_NOT_FOUND")
    ghost = rpc_error(server.stub.CreateServiceAccountToken, token_request(account.client_id))
    assert error_info(ghost).reason == "SERVICE_ACCOUNT_NOT_FOUND"


def test_refusals_are_one_answer_and_tokens_expire_are_capped_and_checked(
    start_server: StartServer, clock: FakeClock
) -> None:
    # The admin's own token must outlast the hours the clock moves on.
    server = start_server(clock=clock, access_token_ttl_seconds=86400)
    plain = create_service_account(server, "reporting").service_account
    other = create_service_account(server, "other").service_account
    revoked = make_token(server, plain.client_id, "revoked")
    server.stub.RevokeServiceAccountToken(
        tpb.RevokeServiceAccountTokenRequest(
            service_account_id=plain.client_id, token_id=revoked.service_account_token.id
        )
    )
    soon = Timestamp()
    soon.FromDatetime(clock.now() + timedelta(hours=1))
    expiring = make_token(server, plain.client_id, "expiring", soon)
    assert expiring.service_account_token.expire_time == soon
    # Without the provisioning permission, the account's token is a plain machine caller.
    machine = server.stub_for(expiring.token)
    machine.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=server.admin_username))
    assert rpc_error(machine.ListUsers, pb.ListUsersRequest()).code() == grpc.StatusCode.PERMISSION_DENIED

    account_id, token_id, secret = plain.client_id, expiring.service_account_token.id, expiring.token[-43:]
    unknown_token = f"usat_{account_id}_{'0' * 24}_{secret}"
    unknown_account = f"usat_{'0' * 24}_{token_id}_{secret}"
    another_accounts = f"usat_{other.client_id}_{token_id}_{secret}"
    wrong_secret = f"usat_{account_id}_{token_id}_{'A' * 43}"
    malformed = [
        "usat_",
        f"usat_{account_id}_{token_id}_{secret}x",
        f"usat_{account_id.upper()}_{token_id}_{secret}",
        "usat_a_b_c",
    ]
    refused = [revoked.token, unknown_token, unknown_account, another_accounts, wrong_secret, *malformed]
    answers = {token: refusal(server, token) for token in refused}
    assert set(answers.values()) == {(UNAUTHENTICATED, "invalid access token", "UNAUTHENTICATED")}, answers

    # Expiry, by the server's clock: the same answer again.
    clock.advance(minutes=59)
    machine.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=server.admin_username))
    clock.advance(minutes=1)
    assert refusal(server, expiring.token) == (UNAUTHENTICATED, "invalid access token", "UNAUTHENTICATED")

    # Without an expire_time: USERS_SERVICE_ACCOUNT_TOKEN_MAX_DAYS (366) from now; no later, never past.
    lasting = make_token(server, other.client_id, "lasting").service_account_token
    assert lasting.expire_time.ToDatetime() - lasting.create_time.ToDatetime() == timedelta(days=366)
    too_late, past = Timestamp(), Timestamp()
    too_late.FromDatetime(clock.now() + timedelta(days=367))
    past.FromDatetime(clock.now())
    for expire_time in (too_late, past):
        late = rpc_error(server.stub.CreateServiceAccountToken, token_request(other.client_id, "x", expire_time))
        assert violated_fields(late) == {"expire_time"}
    bad = tpb.CreateServiceAccountTokenRequest(service_account_id="nope", display_name="")
    assert violated_fields(rpc_error(server.stub.CreateServiceAccountToken, bad)) == {"service_account_id"}
    bad = tpb.CreateServiceAccountTokenRequest(service_account_id=other.client_id, display_name="\x00")
    assert violated_fields(rpc_error(server.stub.CreateServiceAccountToken, bad)) == {"display_name"}

    # last_use_time moves at most hourly, by the server's clock.
    used = make_token(server, other.client_id, "used")
    user = server.stub_for(used.token)

    def use_and_read() -> Any:
        user.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=server.admin_username))
        token = next(t for t in listed(server, other.client_id) if t.id == used.service_account_token.id)
        return token.last_use_time.ToDatetime(UTC)

    first_use = clock.now()
    assert use_and_read() == first_use
    clock.advance(minutes=59)
    assert use_and_read() == first_use
    clock.advance(minutes=1)
    assert use_and_read() == clock.now()

    # At most 10 per account, expired ones included; a revocation makes room.
    for number in range(8):
        make_token(server, other.client_id, f"more-{number}")
    full = rpc_error(server.stub.CreateServiceAccountToken, token_request(other.client_id, "one-too-many"))
    assert (full.code(), error_info(full).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SERVICE_ACCOUNT_TOKEN_LIMIT",
    )
    assert len(listed(server, other.client_id)) == 10
    server.stub.RevokeServiceAccountToken(
        tpb.RevokeServiceAccountTokenRequest(service_account_id=other.client_id, token_id=used.service_account_token.id)
    )
    assert refusal(server, used.token)[0] == UNAUTHENTICATED
    make_token(server, other.client_id, "room-again")
