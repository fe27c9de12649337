"""User metadata through real channels on the real database: both scopes and who reaches each,
the bounds (refused whole, nothing written), two services racing on one key with one etag,
ListUsers by key and value across pages with other filters, and the change feed and the audit
trail (which never holds a value)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from bson import ObjectId
from pymongo import MongoClient

from tests.support.calls import (
    create_service_account,
    error_info,
    issue_service_token,
    rpc_error,
    signed_up,
    violated_fields,
)
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import metadata_pb2 as md
from users.v1 import user_pb2, user_service_pb2_grpc
from users.v1 import user_service_pb2 as pb
from users_grpc.domain.rules import identifier_key

ADMIN = md.METADATA_SCOPE_ADMIN
SELF = md.METADATA_SCOPE_SELF
Stub = user_service_pb2_grpc.UserServiceStub
Document = dict[str, Any]
# Machine callers allowed to write: two services that keep facts on users.
WRITERS = frozenset({"service-account:billing", "service-account:crm"})


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    return start_server(metadata_writers=WRITERS)


@pytest.fixture
def users_collection(server: RunningServer) -> Iterator[Any]:
    client: MongoClient[Document] = MongoClient(server.settings.mongodb_uri)
    with client:
        yield client[server.settings.mongodb_database].users


def machine(server: RunningServer, name: str) -> Stub:
    """A stub calling as the service account ``name`` (a machine caller)."""
    created = create_service_account(server, name)
    issued = issue_service_token(server, created.service_account.client_id, created.client_secret)
    return server.stub_for(issued.access_token)


def set_entry(stub: Stub, user_id: str, scope: Any, key: str, value: bytes, etag: str = "") -> md.MetadataEntry:
    request = md.SetUserMetadataRequest(user_id=user_id, scope=scope, key=key, value=value, etag=etag)
    return stub.SetUserMetadata(request).entry


def listed(stub: Stub, user_id: str, scope: Any = md.METADATA_SCOPE_UNSPECIFIED) -> list[tuple[int, str, bytes]]:
    entries = stub.ListUserMetadata(md.ListUserMetadataRequest(user_id=user_id, scope=scope)).entries
    return [(entry.scope, entry.key, entry.value) for entry in entries]


def code_of(call: Callable[..., Any], request: Any) -> grpc.StatusCode:
    return rpc_error(call, request).code()


def test_set_get_list_and_remove_in_both_scopes(server: RunningServer, mail: MailSink) -> None:
    jane = signed_up(server, mail, "jane")
    own = server.stub_for(jane.access_token)
    billing = machine(server, "billing")
    user_id = jane.user.id

    mine = set_entry(own, user_id, SELF, "theme", b"dark")
    assert (mine.scope, mine.key, mine.value) == (SELF, "theme", b"dark")
    assert mine.etag
    assert mine.HasField("update_time")
    by_admin = set_entry(server.stub, user_id, ADMIN, "tier", b"gold")
    by_machine = set_entry(billing, user_id, ADMIN, "billing.customer_id", b"\x00cus_42\xff")
    # A new value of the same key: replaced, with a new etag.
    again = set_entry(own, user_id, SELF, "theme", b"light")
    assert again.etag != mine.etag

    get = md.GetUserMetadataRequest(user_id=user_id, scope=ADMIN, key="billing.customer_id")
    assert server.stub.GetUserMetadata(get).entry == by_machine
    assert billing.GetUserMetadata(get).entry == by_machine
    self_get = md.GetUserMetadataRequest(user_id=user_id, scope=SELF, key="theme")
    assert own.GetUserMetadata(self_get).entry == again
    assert billing.GetUserMetadata(self_get).entry == again

    every = [(ADMIN, "billing.customer_id", b"\x00cus_42\xff"), (ADMIN, "tier", b"gold"), (SELF, "theme", b"light")]
    assert listed(server.stub, user_id) == every
    assert listed(billing, user_id, ADMIN) == every[:2]
    assert listed(own, user_id) == every[2:]
    assert listed(own, user_id, SELF) == every[2:]

    # The admin view of the user carries both scopes; the user's own view neither.
    admin_view = server.stub.GetUser(pb.GetUserRequest(id=user_id)).user
    assert [(e.scope, e.key, e.value) for e in admin_view.metadata] == every
    assert [e.etag for e in admin_view.metadata if e.key == "tier"] == [by_admin.etag]
    assert [e.key for e in billing.GetUser(pb.GetUserRequest(id=user_id)).user.metadata] == [k for _, k, _ in every]
    assert not own.GetUser(pb.GetUserRequest(id=user_id)).user.metadata
    signed_in = server.anonymous.Authenticate(
        pb.AuthenticateRequest(identifier="jane", password="correct horse battery")
    )
    assert not signed_in.user.metadata
    listed_users = server.stub.ListUsers(pb.ListUsersRequest()).users
    assert [len(u.metadata) for u in listed_users if u.id == user_id] == [3]

    own.DeleteUserMetadata(md.DeleteUserMetadataRequest(user_id=user_id, scope=SELF, key="theme"))
    billing.DeleteUserMetadata(md.DeleteUserMetadataRequest(user_id=user_id, scope=ADMIN, key="tier"))
    assert listed(server.stub, user_id) == every[:1]
    gone = rpc_error(own.GetUserMetadata, self_get)
    assert (gone.code(), error_info(gone).reason) == (grpc.StatusCode.NOT_FOUND, "METADATA_NOT_FOUND")
    missing = rpc_error(
        server.stub.DeleteUserMetadata, md.DeleteUserMetadataRequest(user_id=user_id, scope=SELF, key="theme")
    )
    assert error_info(missing).reason == "METADATA_NOT_FOUND"
    no_user = rpc_error(
        server.stub.SetUserMetadata, md.SetUserMetadataRequest(user_id=str(ObjectId()), scope=SELF, key="k")
    )
    assert (no_user.code(), error_info(no_user).reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


def test_the_user_never_reaches_the_admin_scope_nor_anyone_elses_metadata(
    server: RunningServer, mail: MailSink
) -> None:
    jane = signed_up(server, mail, "jane")
    bob = signed_up(server, mail, "bob")
    own = server.stub_for(jane.access_token)
    reader = machine(server, "reports")  # a machine caller not among USERS_METADATA_WRITERS
    set_entry(server.stub, jane.user.id, ADMIN, "risk", b"high")
    set_entry(server.stub, bob.user.id, SELF, "theme", b"dark")
    before = listed(server.stub, jane.user.id), listed(server.stub, bob.user.id)

    denied = grpc.StatusCode.PERMISSION_DENIED
    admin_scope: dict[str, Any] = {"user_id": jane.user.id, "scope": ADMIN, "key": "risk"}
    assert code_of(own.SetUserMetadata, md.SetUserMetadataRequest(**admin_scope, value=b"low")) == denied
    assert code_of(own.GetUserMetadata, md.GetUserMetadataRequest(**admin_scope)) == denied
    assert code_of(own.DeleteUserMetadata, md.DeleteUserMetadataRequest(**admin_scope)) == denied
    assert code_of(own.ListUserMetadata, md.ListUserMetadataRequest(user_id=jane.user.id, scope=ADMIN)) == denied
    # Hidden, not merely refused: her own listing holds no admin entry.
    assert listed(own, jane.user.id) == []
    bobs: dict[str, Any] = {"user_id": bob.user.id, "scope": SELF, "key": "theme"}
    assert code_of(own.SetUserMetadata, md.SetUserMetadataRequest(**bobs, value=b"pink")) == denied
    assert code_of(own.GetUserMetadata, md.GetUserMetadataRequest(**bobs)) == denied
    assert code_of(own.DeleteUserMetadata, md.DeleteUserMetadataRequest(**bobs)) == denied
    assert code_of(own.ListUserMetadata, md.ListUserMetadataRequest(user_id=bob.user.id)) == denied
    # A machine caller not listed as a writer reads, and writes nothing.
    assert reader.GetUserMetadata(md.GetUserMetadataRequest(**admin_scope)).entry.value == b"high"
    assert code_of(reader.SetUserMetadata, md.SetUserMetadataRequest(**admin_scope, value=b"low")) == denied
    assert code_of(reader.DeleteUserMetadata, md.DeleteUserMetadataRequest(**bobs)) == denied
    assert (listed(server.stub, jane.user.id), listed(server.stub, bob.user.id)) == before


def test_malformed_and_oversize_writes_are_refused_whole(
    server: RunningServer, mail: MailSink, users_collection: Any
) -> None:
    jane = signed_up(server, mail, "jane")
    user_id = jane.user.id
    set_entry(server.stub, user_id, ADMIN, "kept", b"v")

    def refused(**fields: Any) -> set[str]:
        error = rpc_error(server.stub.SetUserMetadata, md.SetUserMetadataRequest(user_id=user_id, **fields))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        return violated_fields(error)

    def stored() -> Any:
        document = users_collection.find_one({"_id": ObjectId(user_id)}, {"metadata": 1, "metadata_revision": 1})
        assert document is not None
        return document

    before = stored()
    for key in ("", "-leading-dash", "white space", "ümlaut", "a" * 65, "slash/key", "semi;colon"):
        assert refused(scope=ADMIN, key=key, value=b"v") == {"key"}, key
    assert refused(scope=ADMIN, key="big", value=b"x" * 4097) == {"value"}
    assert refused(scope=md.METADATA_SCOPE_UNSPECIFIED, key="k") == {"scope"}
    assert refused(scope=99, key="k") == {"scope"}
    assert refused(scope=ADMIN, key="kept", value=b"w", etag="not an etag") == {"etag"}
    assert stored() == before

    # The longest key and the largest value are allowed.
    set_entry(server.stub, user_id, ADMIN, "a" * 64, b"x" * 4096)
    # The scope holds 16384 bytes of keys and values: two more of 4096 + 4 bytes fit, a third does not.
    set_entry(server.stub, user_id, ADMIN, "big1", b"x" * 4096)
    set_entry(server.stub, user_id, ADMIN, "big2", b"x" * 4096)
    full = stored()
    assert refused(scope=ADMIN, key="big3", value=b"x" * 4096) == {"value"}
    # Growing an entry counts too (12365 bytes stored; "kept" would grow by 4095).
    assert refused(scope=ADMIN, key="kept", value=b"x" * 4096) == {"value"}
    assert stored() == full
    # The self scope has bounds of its own: a full admin scope does not crowd it out.
    set_entry(server.stub, user_id, SELF, "big1", b"x" * 4096)

    # At most 64 entries per scope.
    own = server.stub_for(jane.access_token)
    for number in range(63):
        set_entry(own, user_id, SELF, f"n{number}", b"")
    assert len(listed(own, user_id)) == 64
    counted = stored()
    assert refused(scope=SELF, key="one-more", value=b"") == {"key"}
    assert stored() == counted
    set_entry(own, user_id, SELF, "n0", b"replacing is no new entry")


def test_two_services_racing_on_one_key_with_one_etag_one_wins(server: RunningServer, mail: MailSink) -> None:
    jane = signed_up(server, mail, "jane")
    user_id = jane.user.id
    services = [machine(server, "billing"), machine(server, "crm")]
    etag = set_entry(server.stub, user_id, ADMIN, "plan", b"free").etag

    def race(calls: list[Callable[[], Any]]) -> list[grpc.StatusCode]:
        """The calls at once, each from its own thread, released together."""
        start = threading.Barrier(len(calls))

        def run(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
            start.wait()
            try:
                call()
            except grpc.RpcError as error:
                return error.code(), error_info(error).reason
            return grpc.StatusCode.OK, ""

        with ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(run, calls))
        assert {reason for code, reason in results if code != grpc.StatusCode.OK} <= {"ETAG_MISMATCH"}
        return [code for code, _ in results]

    for round_number in range(8):
        values = [f"{name}-{round_number}".encode() for name in ("billing", "crm")]
        outcomes = race(
            [
                functools.partial(set_entry, stub, user_id, ADMIN, "plan", value, etag=etag)
                for stub, value in zip(services, values, strict=True)
            ]
        )
        assert sorted(outcomes, key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.ABORTED], key=str)
        # The winner's value is stored, and the loser's write left no trace.
        entry = server.stub.GetUserMetadata(md.GetUserMetadataRequest(user_id=user_id, scope=ADMIN, key="plan")).entry
        assert entry.value == values[outcomes.index(grpc.StatusCode.OK)]
        etag = entry.etag

    # A removal racing a write with the same etag: one of them.
    remove = md.DeleteUserMetadataRequest(user_id=user_id, scope=ADMIN, key="plan", etag=etag)
    outcomes = race(
        [
            lambda: services[0].DeleteUserMetadata(remove),
            lambda: set_entry(services[1], user_id, ADMIN, "plan", b"paid", etag=etag),
        ]
    )
    assert sorted(outcomes, key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.ABORTED], key=str)
    expected = [] if outcomes[0] == grpc.StatusCode.OK else [(ADMIN, "plan", b"paid")]
    assert listed(server.stub, user_id) == expected
    # An etag of an entry since removed, or rewritten, is stale.
    stale = rpc_error(
        services[0].SetUserMetadata, md.SetUserMetadataRequest(user_id=user_id, scope=ADMIN, key="plan", etag=etag)
    )
    assert (stale.code(), error_info(stale).reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")


def test_list_users_by_metadata_with_other_filters_across_pages(server: RunningServer, users_collection: Any) -> None:
    template = users_collection.find_one({"username": server.admin_username})
    tenants = ["acme", "acme", "globex", "", "acme", "acme", None, "acme", "acme", "globex"]
    ids: list[str] = []
    for number, tenant in enumerate(tenants):
        name = f"user{number}"
        email = f"{name}@example.com"
        state = "locked" if number in (1, 5) else "active"
        document = {
            **template,
            "_id": ObjectId(),
            "username": name,
            "username_key": identifier_key(name),
            "email": email,
            "email_key": identifier_key(email),
            "role": "user",
            "state": state,
            "is_active": state == "active",
        }
        document.pop("metadata", None)
        users_collection.insert_one(document)
        ids.append(str(document["_id"]))
        if tenant is not None:
            set_entry(server.stub, ids[-1], ADMIN, "tenant", tenant.encode())
    # The same key in the other scope is another entry: never matched by an admin-scope filter.
    set_entry(server.stub, ids[3], SELF, "tenant", b"acme")

    def pages(**filters: Any) -> list[str]:
        found: list[str] = []
        token = ""
        while True:
            page = server.stub.ListUsers(pb.ListUsersRequest(page_size=2, page_token=token, **filters))
            assert len(page.users) <= 2
            found.extend(user.id for user in page.users)
            token = page.next_page_token
            if not token:
                return found

    acme = md.MetadataFilter(scope=ADMIN, key="tenant", value=b"acme")
    assert pages(metadata=acme) == [ids[i] for i in (0, 1, 4, 5, 7, 8)]
    active = user_pb2.USER_STATE_ACTIVE
    assert pages(metadata=acme, state=active) == [ids[i] for i in (0, 4, 7, 8)]
    assert (
        server.stub.ListUsers(pb.ListUsersRequest(metadata=acme, state=active, include_total_size=True)).total_size == 4
    )
    present = md.MetadataFilter(scope=ADMIN, key="tenant")
    assert pages(metadata=present, state=active, prefix="user") == [ids[i] for i in (0, 2, 3, 4, 7, 8, 9)]
    empty = md.MetadataFilter(scope=ADMIN, key="tenant", value=b"")
    assert pages(metadata=empty) == [ids[3]]
    assert pages(metadata=md.MetadataFilter(scope=SELF, key="tenant", value=b"acme")) == [ids[3]]
    assert pages(metadata=md.MetadataFilter(scope=ADMIN, key="nobody-has-it")) == []

    # A page token is bound to its metadata filter too.
    first = server.stub.ListUsers(pb.ListUsersRequest(page_size=2, metadata=acme))
    other = md.MetadataFilter(scope=ADMIN, key="tenant", value=b"globex")
    error = rpc_error(
        server.stub.ListUsers, pb.ListUsersRequest(page_size=2, metadata=other, page_token=first.next_page_token)
    )
    assert violated_fields(error) == {"page_token"}
    bad = rpc_error(server.stub.ListUsers, pb.ListUsersRequest(metadata=md.MetadataFilter(scope=ADMIN, key="a b")))
    assert violated_fields(bad) == {"metadata.key"}
    no_scope = rpc_error(server.stub.ListUsers, pb.ListUsersRequest(metadata=md.MetadataFilter(key="tenant")))
    assert violated_fields(no_scope) == {"metadata.scope"}


def test_changes_reach_the_feed_and_the_audit_trail_without_values(
    server: RunningServer, mail: MailSink, users_collection: Any
) -> None:
    jane = signed_up(server, mail, "jane")
    own = server.stub_for(jane.access_token)
    billing = machine(server, "billing")
    user_id = jane.user.id
    secret = b"admin-only-fact-7f3a"
    set_entry(billing, user_id, ADMIN, "billing.customer_id", secret)
    set_entry(own, user_id, SELF, "theme", b"self-chosen-text")
    server.stub.DeleteUserMetadata(md.DeleteUserMetadataRequest(user_id=user_id, scope=SELF, key="theme"))

    changes: list[pb.UserChange] = []
    stream = server.stub.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)
    try:
        for response in stream:
            if response.change.user_id == user_id and response.change.type == pb.USER_CHANGE_TYPE_METADATA_CHANGED:
                changes.append(response.change)
            if len(changes) == 3:
                break
    finally:
        stream.cancel()
    assert [[(k.scope, k.key) for k in c.metadata_keys] for c in changes] == [
        [(ADMIN, "billing.customer_id")],
        [(SELF, "theme")],
        [(SELF, "theme")],
    ]
    numbers = [c.user_change_number for c in changes]
    assert numbers == list(range(numbers[0], numbers[0] + 3))
    # The feed is for admins and machine callers: the user as stored, with its metadata.
    assert any(e.value == secret for e in changes[0].user.metadata)

    events = server.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(
            subject_id=user_id, types=[pb.AUDIT_EVENT_TYPE_METADATA_SET, pb.AUDIT_EVENT_TYPE_METADATA_DELETE]
        )
    ).audit_events
    assert [(e.type, e.note, e.actor.kind) for e in reversed(events)] == [
        (
            pb.AUDIT_EVENT_TYPE_METADATA_SET,
            "scope METADATA_SCOPE_ADMIN, key billing.customer_id",
            pb.AUDIT_ACTOR_KIND_SERVICE_ACCOUNT,
        ),
        (pb.AUDIT_EVENT_TYPE_METADATA_SET, "scope METADATA_SCOPE_SELF, key theme", pb.AUDIT_ACTOR_KIND_USER),
        (pb.AUDIT_EVENT_TYPE_METADATA_DELETE, "scope METADATA_SCOPE_SELF, key theme", pb.AUDIT_ACTOR_KIND_USER),
    ]
    # No value anywhere in the trail as stored.
    trail = list(users_collection.database.audit_events.find())
    assert trail
    assert secret.decode() not in repr(trail)
    assert "self-chosen-text" not in repr(trail)
    # A refused write is recorded too, with the status the caller got.
    rpc_error(own.SetUserMetadata, md.SetUserMetadataRequest(user_id=user_id, scope=ADMIN, key="x"))
    # Refused by the service (the scope), not the access rule: recorded.
    refused = server.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(subject_id=user_id, types=[pb.AUDIT_EVENT_TYPE_METADATA_SET], page_size=1)
    ).audit_events[0]
    assert (refused.error_reason, refused.note) == ("PERMISSION_DENIED", "scope METADATA_SCOPE_ADMIN, key x")
