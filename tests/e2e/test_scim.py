"""SCIM 2.0 at /scim/v2 against a real server over real HTTP: scim2-tester's checks, and the
request sequences Okta and Entra ID publish, with the results read back over gRPC."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import grpc
import httpx2
import pytest
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_tester import Status, check_server

from tests.e2e.test_observability import scrape
from tests.support.calls import create_service_account, issue_service_token
from tests.support.servers import RunningServer, StartServer
from users.v1 import service_account_token_pb2 as tpb
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb

SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    return start_server(http_address="127.0.0.1:0")


def service_token(server: RunningServer, *permissions: pb.ServiceAccountPermission.ValueType) -> str:
    account = create_service_account(server, f"idp-{uuid.uuid4().hex[:8]}", permissions)
    return issue_service_token(server, account.service_account.client_id, account.client_secret).access_token


def scim_client(server: RunningServer, token: str) -> httpx2.Client:
    base_url = f"http://127.0.0.1:{server.app.http_port}/scim/v2"
    return httpx2.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def long_lived_token(server: RunningServer, *permissions: pb.ServiceAccountPermission.ValueType) -> str:
    """A service-account token (usat_...), as docs/scim.md has an IdP configured with."""
    account = create_service_account(server, f"idp-{uuid.uuid4().hex[:8]}", permissions)
    request = tpb.CreateServiceAccountTokenRequest(
        service_account_id=account.service_account.client_id, display_name="scim"
    )
    return server.stub.CreateServiceAccountToken(request).token


@pytest.fixture
def scim(server: RunningServer) -> Iterator[httpx2.Client]:
    """A client of the server's own HTTP edge, at /scim/v2, as an IdP: a provisioning service
    account's long-lived token (IssueServiceToken's work the same: the refusal test uses one)."""
    with scim_client(server, long_lived_token(server, pb.SERVICE_ACCOUNT_PERMISSION_PROVISION_USERS)) as client:
        yield client


class FreshUsernames(Sequence[str]):
    """scim2-tester fills userName with a 36-character uuid; usernames are at most 32 characters.
    It picks from a field's examples (random.choice): this list of one is a new name every time."""

    def __len__(self) -> int:
        return 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return uuid.uuid4().hex


def test_scim2_tester_finds_every_check_a_success(scim: httpx2.Client) -> None:
    client = SyncSCIMClient(scim)
    client.discover()
    user_model = client.get_resource_model("User")
    assert user_model is not None
    user_model.model_fields["user_name"].examples = FreshUsernames()  # type: ignore[assignment]
    results = check_server(client, resource_types=["User"])
    failures = {(result.title, _gap(result.reason or "")) for result in results if result.status != Status.SUCCESS}
    assert len(results) > 20
    assert failures == KNOWN_GAPS


def _gap(reason: str) -> str:
    return next((gap for gap in GAPS if gap in reason), reason)


# None left: every check is a success.
GAPS: tuple[str, ...] = ()
KNOWN_GAPS: set[tuple[str, str]] = set()


def _user(server: RunningServer, user_id: str) -> user_pb2.User:
    return server.stub.GetUser(pb.GetUserRequest(id=user_id), timeout=10).user


def test_okta_sequence_creates_finds_deactivates_renames_and_deletes(
    server: RunningServer, scim: httpx2.Client
) -> None:
    # Okta's published SCIM 2.0 flow: look up by userName, create, deactivate with PATCH, update, delete.
    name = f"okta-{uuid.uuid4().hex[:8]}"
    found = scim.get("/Users", params={"filter": f'userName eq "{name}"', "startIndex": 1, "count": 100})
    assert found.status_code == 200
    assert found.json()["totalResults"] == 0
    created = scim.post(
        "/Users",
        json={
            "schemas": [SCHEMA],
            "userName": name,
            "name": {"givenName": "Ada", "familyName": "Lovelace"},
            "emails": [{"primary": True, "value": f"{name}@example.com", "type": "work"}],
            "displayName": "Ada Lovelace",
            "locale": "en-US",
            "groups": [],
            "active": True,
        },
    )
    assert created.status_code == 201, created.text
    user_id = created.json()["id"]
    assert _user(server, user_id).state == user_pb2.USER_STATE_ACTIVE
    found = scim.get("/Users", params={"filter": f'userName eq "{name.upper()}"'}).json()
    assert [resource["id"] for resource in found["Resources"]] == [user_id]

    off = scim.patch(
        f"/Users/{user_id}", json={"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": False}}]}
    )
    assert off.status_code == 200, off.text
    assert off.json()["active"] is False
    assert _user(server, user_id).state == user_pb2.USER_STATE_DEACTIVATED
    events = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(subject_id=user_id), timeout=10).audit_events
    [deactivated] = [event for event in events if event.type == pb.AUDIT_EVENT_TYPE_USER_DEACTIVATE]
    assert deactivated.actor.kind == pb.AUDIT_ACTOR_KIND_SERVICE_ACCOUNT

    renamed = scim.patch(
        f"/Users/{user_id}",
        json={
            "schemas": [PATCH],
            "Operations": [
                {"op": "replace", "value": {"name": {"givenName": "Augusta", "familyName": "King"}}},
                {"op": "replace", "value": {"emails": [{"value": f"{name}@new.example", "primary": True}]}},
            ],
        },
    )
    assert renamed.status_code == 200, renamed.text
    user = _user(server, user_id)
    assert (user.first_name, user.last_name, user.email) == ("Augusta", "King", f"{name}@new.example")

    assert scim.delete(f"/Users/{user_id}").status_code == 204
    assert scim.get(f"/Users/{user_id}").status_code == 404


def test_entra_sequence_with_its_capitalised_ops_and_string_booleans(
    server: RunningServer, scim: httpx2.Client
) -> None:
    # Entra ID's published requests: "Replace"/"Add" with a path, "False" as a string, a filtered email path.
    name = f"entra-{uuid.uuid4().hex[:8]}"
    assert scim.get("/Users", params={"filter": f'userName eq "{name}"'}).json()["totalResults"] == 0
    created = scim.post(
        "/Users",
        json={
            "schemas": [SCHEMA, "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
            "userName": name,
            "active": True,
            "displayName": "Grace Hopper",
            "emails": [{"primary": True, "type": "work", "value": f"{name}@example.com"}],
            "name": {"formatted": "Grace Hopper", "familyName": "Hopper", "givenName": "Grace"},
            "roles": [],
        },
    )
    assert created.status_code == 201, created.text
    user_id = created.json()["id"]
    patched = scim.patch(
        f"/Users/{user_id}",
        json={
            "schemas": [PATCH],
            "Operations": [
                {"op": "Replace", "path": "active", "value": "False"},
                {"op": "Add", "path": "name.givenName", "value": "Amazing Grace"},
                {"op": "Replace", "path": "name.familyName", "value": "Murray"},
            ],
        },
    )
    assert patched.status_code == 200, patched.text
    user = _user(server, user_id)
    assert (user.first_name, user.last_name, user.state) == ("Amazing Grace", "Murray", user_pb2.USER_STATE_DEACTIVATED)
    by_email = scim.get("/Users", params={"filter": f'emails[type eq "work"].value eq "{name}@example.com"'}).json()
    assert [resource["id"] for resource in by_email["Resources"]] == [user_id]
    assert scim.delete(f"/Users/{user_id}").status_code == 204
    assert scim.get(f"/Users/{user_id}").status_code == 404


def test_refusals_are_scim_errors(server: RunningServer, scim: httpx2.Client) -> None:
    anonymous = httpx2.get(f"{scim.base_url}Users")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert scim.get("/Users", params={"filter": 'title co "x"'}).json()["scimType"] == "invalidFilter"
    body = {
        "schemas": [SCHEMA],
        "userName": server.admin_username,
        "name": {"givenName": "A", "familyName": "B"},
        "emails": [{"value": f"{uuid.uuid4().hex}@example.com"}],
    }
    taken = scim.post("/Users", json=body)
    assert (taken.status_code, taken.json()["scimType"]) == (409, "uniqueness")
    stale = scim.put(
        f"/Users/{server.admin_id}",
        json=body | {"userName": "x" + server.admin_username[:20]},
        headers={"If-Match": 'W/"stale"'},
    )
    assert stale.status_code == 412


def test_a_filter_is_refused_by_its_length_before_it_is_parsed(server: RunningServer) -> None:
    # Any bearer reaches the parser (the token is checked by the calls made after it): a filter's
    # whitespace cost the parser time quadratic in its length, on the loop every call shares; half
    # a MiB took it an hour. Refused by length now, at once, whoever sends it.
    padded = 'userName eq "x"' + " " * 500_000 + 'and userName eq "y"'
    search = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"], "filter": padded}
    # So were a search's attributes, validated before any call (quadratic in their number: 40,000
    # stalled it some 15 s), and any body (a MiB of emails or PATCH operations: seconds).
    names = [f"name.givenName{n}" for n in range(40_000)]
    emails = [{"value": f"a{n}@example.com"} for n in range(101)]
    with scim_client(server, "not-a-token") as stranger:
        answers = [
            stranger.post("/.search", json=search | {"filter": padded[:60_000]}),
            stranger.get("/Users", params={"filter": padded[:15_000] + 'and userName eq "y"'}),
        ]
        too_many = [
            stranger.post("/.search", json={"schemas": search["schemas"], "attributes": names[:101]}),
            stranger.get("/Users", params={"excludedAttributes": ",".join(names[:500])}),
            stranger.post("/Users", json={"schemas": [SCHEMA], "userName": "many", "emails": emails}),
        ]
        too_large = stranger.post("/Users", json={"schemas": [SCHEMA], "userName": "big", "emails": emails * 30})
        # PUT and PATCH read the user first: the bearer is checked before their body is validated.
        unread = [
            stranger.patch(f"/Users/{server.admin_id}", json={"schemas": [PATCH], "Operations": "none"}),
            stranger.put(f"/Users/{server.admin_id}", json={"schemas": [SCHEMA], "emails": "none"}),
        ]
    assert [answer.status_code for answer in unread] == [401, 401]
    for answer in answers:
        assert (answer.status_code, answer.json()["scimType"]) == (400, "invalidFilter")
        assert "longer than" in answer.json()["detail"]
    for answer in too_many:
        assert (answer.status_code, answer.json()["scimType"]) == (400, "invalidValue")
        assert "at most 100 " in answer.json()["detail"]
    assert too_large.status_code == 413


def test_a_body_nested_past_the_parser_is_invalid_syntax(scim: httpx2.Client) -> None:
    # The JSON parser's recursion limit was an unhandled RecursionError: a 500 and a traceback.
    for body in (b"[" * 50_000, b'{"a":' * 10_000, b'{"a":' * 20 + b"1" + b"}" * 20):
        answer = scim.post("/Users", content=body, headers={"Content-Type": "application/scim+json"})
        assert (answer.status_code, answer.json()["scimType"]) == (400, "invalidSyntax")


def test_external_id_is_kept_found_changed_and_limited(server: RunningServer, scim: httpx2.Client) -> None:
    name = f"ext-{uuid.uuid4().hex[:8]}"
    external_id = f"00u{uuid.uuid4().hex}"
    body = {
        "schemas": [SCHEMA],
        "userName": name,
        "externalId": external_id,
        "name": {"givenName": "Ext", "familyName": "Ernal"},
        "emails": [{"value": f"{name}@example.com", "primary": True}],
    }
    created = scim.post("/Users", json=body)
    assert created.status_code == 201, created.text
    user_id = created.json()["id"]
    assert created.json()["externalId"] == external_id
    assert _user(server, user_id).external_id == external_id
    found = scim.get("/Users", params={"filter": f'externalId eq "{external_id}"'}).json()
    assert [resource["id"] for resource in found["Resources"]] == [user_id]
    assert scim.get("/Users", params={"filter": f'externalId eq "{external_id.upper()}"'}).json()["totalResults"] == 0

    moved = external_id + "-2"
    patch = {"schemas": [PATCH], "Operations": [{"op": "replace", "path": "externalId", "value": moved}]}
    assert scim.patch(f"/Users/{user_id}", json=patch).status_code == 200
    listed = server.stub.ListUsers(pb.ListUsersRequest(external_id=moved), timeout=10).users
    assert [user.id for user in listed] == [user_id]
    assert not server.stub.ListUsers(pb.ListUsersRequest(external_id=external_id), timeout=10).users
    removed = {"schemas": [PATCH], "Operations": [{"op": "remove", "path": "externalId"}]}
    assert "externalId" not in scim.patch(f"/Users/{user_id}", json=removed).json()
    assert _user(server, user_id).external_id == ""

    too_long = scim.post("/Users", json=body | {"userName": name + "x", "externalId": "x" * 257})
    assert (too_long.status_code, too_long.json()["scimType"]) == (400, "invalidValue")
    assert "external_id" in too_long.json()["detail"]


def test_a_service_account_without_the_permission_is_refused(server: RunningServer) -> None:
    with scim_client(server, service_token(server)) as plain:
        assert plain.get("/Users").status_code == 403
        body = {
            "schemas": [SCHEMA],
            "userName": f"no-{uuid.uuid4().hex[:8]}",
            "name": {"givenName": "N", "familyName": "O"},
            "emails": [{"value": f"{uuid.uuid4().hex}@example.com"}],
        }
        assert plain.post("/Users", json=body).status_code == 403


def test_provisioning_never_touches_or_makes_an_admin(server: RunningServer, scim: httpx2.Client) -> None:
    admin = f"/Users/{server.admin_id}"
    assert scim.get(admin).status_code == 200  # reading is allowed: an IdP looks before it creates
    off = {"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": False}}]}
    assert scim.patch(admin, json=off).status_code == 403
    rename = {"schemas": [PATCH], "Operations": [{"op": "replace", "path": "name.givenName", "value": "Mallory"}]}
    assert scim.patch(admin, json=rename).status_code == 403
    assert scim.delete(admin).status_code == 403
    user = _user(server, server.admin_id)
    assert user.state == user_pb2.USER_STATE_ACTIVE
    assert user.first_name != "Mallory"

    stub = server.stub_for(scim.headers["authorization"].removeprefix("Bearer "))
    item = pb.ImportedUser(
        username=f"adm-{uuid.uuid4().hex[:8]}",
        first_name="A",
        last_name="D",
        email=f"{uuid.uuid4().hex}@example.com",
        role=user_pb2.ROLE_ADMIN,
        email_verified=True,
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.ImportUsers(pb.ImportUsersRequest(users=[item]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    calls: list[Callable[[], object]] = [
        lambda: stub.SetUserEmail(pb.SetUserEmailRequest(user_id=server.admin_id, email="x@example.com"), timeout=10),
        lambda: stub.DeactivateUser(pb.DeactivateUserRequest(user_id=server.admin_id), timeout=10),
        lambda: stub.SetUserRole(pb.SetUserRoleRequest(user_id=server.admin_id, role=user_pb2.ROLE_USER), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_search_by_post_and_active_cannot_be_removed(server: RunningServer, scim: httpx2.Client) -> None:
    name = f"srch-{uuid.uuid4().hex[:8]}"
    body = {
        "schemas": [SCHEMA],
        "userName": name,
        "active": False,
        "name": {"givenName": "Se", "familyName": "Arch"},
        "emails": [{"value": f"{name}@example.com", "primary": True}],
    }
    user_id = scim.post("/Users", json=body).json()["id"]
    search = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
        "filter": f'userName eq "{name}"',
        "attributes": ["userName"],
    }
    for path in ("/Users/.search", "/.search"):
        found = scim.post(path, json=search)
        assert found.status_code == 200, found.text
        [resource] = found.json()["Resources"]
        assert (resource["id"], resource["userName"]) == (user_id, name)
        assert "name" not in resource
    # Unfiltered: totalResults counts every user (ListUsers counts only when asked to).
    listed = scim.get("/Users", params={"startIndex": 2, "count": 1}).json()
    everyone = server.stub.ListUsers(pb.ListUsersRequest(include_total_size=True)).total_size
    assert (listed["totalResults"], len(listed["Resources"])) == (everyone, 1)
    assert everyone >= 2  # the admin and this user
    # An empty userName or email matches no one, and walks no one: as ListUsers' prefix it walked every user.
    listed = _list_users_calls(server)  # counted before each SCIM answer: the call runs within it
    for empty in ('userName eq ""', 'emails.value eq ""', f'userName eq "" and externalId eq "{name}"'):
        assert scim.get("/Users", params={"filter": empty}).json()["totalResults"] == 0
    assert _list_users_calls(server) == listed
    too_many = scim.post("/Users/.search", json=search | {"count": 1001})
    assert (too_many.status_code, too_many.json()["scimType"]) == (400, "invalidValue")

    removed = scim.patch(
        f"/Users/{user_id}", json={"schemas": [PATCH], "Operations": [{"op": "remove", "path": "active"}]}
    )
    assert (removed.status_code, removed.json()["scimType"]) == (400, "mutability")
    assert _user(server, user_id).state == user_pb2.USER_STATE_DEACTIVATED


def _list_users_calls(server: RunningServer) -> dict[tuple[tuple[str, str], ...], float]:
    calls = scrape(server)["users_grpc_calls_total"]
    return {labels: count for labels, count in calls.items() if ("method", "ListUsers") in labels}
