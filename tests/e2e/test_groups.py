"""Groups through real channels on the real database (issue 25): created, renamed, listed in pages and
deleted by admins; members added, removed and listed both ways in pages; a user sees only their own;
the next access token carries the groups claim; every membership change reaches the change feed and
the audit trail; and neither a deleted group nor a deleted user leaves a membership behind."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import pytest
from bson import ObjectId
from pymongo import MongoClient

from tests.e2e.test_change_feed import watch_until
from tests.support.calls import create_request, error_info, refresh, rpc_error, signed_up, violated_fields
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import group_pb2 as gpb
from users.v1 import user_service_pb2 as pb
from users_grpc.domain.groups import MAX_GROUPS_PER_USER

T = pb.UserChangeType
# The background housekeeping runs once at start only: the tests sweep deleted groups themselves.
QUIET = {"housekeeping_interval_seconds": 3600}


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    return start_server(**QUIET)


@pytest.fixture
def database(server: RunningServer) -> Iterator[Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri, tz_aware=True)
    with client:
        yield client[server.settings.mongodb_database]


def new_group(server: RunningServer, name: str) -> gpb.Group:
    return server.stub.CreateGroup(gpb.CreateGroupRequest(name=name)).group


def new_user(server: RunningServer, name: str) -> str:
    """A user made by the admin (no need to activate one to make them a member)."""
    return str(server.stub.CreateUser(create_request(username=name, email=f"{name}@example.com")).user.id)


def add(server: RunningServer, group_id: str, user_id: str) -> None:
    server.stub.AddGroupMember(gpb.AddGroupMemberRequest(group_id=group_id, user_id=user_id))


def all_pages(call: Any, request: Any, field: str) -> list[list[Any]]:
    """Every page of a list, following next_page_token to the end."""
    pages = []
    while True:
        page = call(request)
        pages.append(list(getattr(page, field)))
        if not page.next_page_token:
            return pages
        request.page_token = page.next_page_token


def groups_claim(access_token: str) -> list[str] | None:
    claims = jwt.decode(access_token, options={"verify_signature": False})
    return claims.get("groups")


def test_groups_are_created_renamed_listed_in_pages_and_deleted(server: RunningServer) -> None:
    alpha, beta, gamma = (new_group(server, name) for name in ("Alpha", "beta", "gamma"))
    assert alpha.name == "Alpha"
    assert alpha.update_time == alpha.create_time

    # Names are unique as usernames are: after case folding and NFKC.
    for taken in ("alpha", " ALPHA ", "\uff41lpha"):
        error = rpc_error(server.stub.CreateGroup, gpb.CreateGroupRequest(name=taken))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS, taken
        assert error_info(error).metadata["field"] == "name"
    for bad in ("", "   ", "a\nb", "x" * 65):
        error = rpc_error(server.stub.CreateGroup, gpb.CreateGroupRequest(name=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert violated_fields(error) == {"name"}

    pages = all_pages(server.stub.ListGroups, gpb.ListGroupsRequest(page_size=2), "groups")
    assert [[g.id for g in page] for page in pages] == [[alpha.id, beta.id], [gamma.id]]
    bad_token = rpc_error(server.stub.ListGroups, gpb.ListGroupsRequest(page_token="nonsense"))
    assert bad_token.code() == grpc.StatusCode.INVALID_ARGUMENT

    renamed = server.stub.RenameGroup(gpb.RenameGroupRequest(group_id=beta.id, name="Beta team")).group
    assert (renamed.id, renamed.name, renamed.create_time) == (beta.id, "Beta team", beta.create_time)
    clash = rpc_error(server.stub.RenameGroup, gpb.RenameGroupRequest(group_id=beta.id, name="GAMMA"))
    assert clash.code() == grpc.StatusCode.ALREADY_EXISTS

    server.stub.DeleteGroup(gpb.DeleteGroupRequest(group_id=gamma.id))
    listed = server.stub.ListGroups(gpb.ListGroupsRequest()).groups
    assert [(g.id, g.name) for g in listed] == [(alpha.id, "Alpha"), (beta.id, "Beta team")]
    for call, request in [
        (server.stub.DeleteGroup, gpb.DeleteGroupRequest(group_id=gamma.id)),
        (server.stub.RenameGroup, gpb.RenameGroupRequest(group_id=gamma.id, name="back")),
        (server.stub.ListGroupMembers, gpb.ListGroupMembersRequest(group_id=gamma.id)),
        (server.stub.AddGroupMember, gpb.AddGroupMemberRequest(group_id=gamma.id, user_id=server.admin_id)),
    ]:
        gone = rpc_error(call, request)
        assert (gone.code(), error_info(gone).reason) == (grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND")
    # A deleted group's name is free at once, for a new group.
    assert new_group(server, "Gamma").id != gamma.id


def test_members_are_added_removed_and_listed_across_pages_both_ways(server: RunningServer) -> None:
    team = new_group(server, "team")
    users = sorted(new_user(server, name) for name in ("ann", "bob", "cyd"))
    for user_id in users:
        add(server, team.id, user_id)

    again = rpc_error(server.stub.AddGroupMember, gpb.AddGroupMemberRequest(group_id=team.id, user_id=users[0]))
    assert (again.code(), error_info(again).metadata["field"]) == (grpc.StatusCode.ALREADY_EXISTS, "user_id")
    nobody = rpc_error(server.stub.AddGroupMember, gpb.AddGroupMemberRequest(group_id=team.id, user_id="f" * 24))
    assert (nobody.code(), error_info(nobody).reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    bad_id = rpc_error(server.stub.AddGroupMember, gpb.AddGroupMemberRequest(group_id="x", user_id=users[0]))
    assert violated_fields(bad_id) == {"group_id"}

    request = gpb.ListGroupMembersRequest(group_id=team.id, page_size=2)
    pages = all_pages(server.stub.ListGroupMembers, request, "members")
    assert [[m.user_id for m in page] for page in pages] == [users[:2], users[2:]]
    # A page token of one group's list is no token of another's.
    other = new_group(server, "other")
    first = server.stub.ListGroupMembers(gpb.ListGroupMembersRequest(group_id=team.id, page_size=1))
    crossed = rpc_error(
        server.stub.ListGroupMembers,
        gpb.ListGroupMembersRequest(group_id=other.id, page_token=first.next_page_token),
    )
    assert violated_fields(crossed) == {"page_token"}

    server.stub.RemoveGroupMember(gpb.RemoveGroupMemberRequest(group_id=team.id, user_id=users[1]))
    remaining = server.stub.ListGroupMembers(gpb.ListGroupMembersRequest(group_id=team.id)).members
    assert [m.user_id for m in remaining] == [users[0], users[2]]
    twice = rpc_error(server.stub.RemoveGroupMember, gpb.RemoveGroupMemberRequest(group_id=team.id, user_id=users[1]))
    assert (twice.code(), error_info(twice).reason) == (grpc.StatusCode.NOT_FOUND, "GROUP_MEMBER_NOT_FOUND")

    # One user's groups, in group id order, across pages.
    more = [new_group(server, name) for name in ("g1", "g2")]
    for group in (other, *more):
        add(server, group.id, users[0])
    request_groups = gpb.ListUserGroupsRequest(user_id=users[0], page_size=2)
    pages = all_pages(server.stub.ListUserGroups, request_groups, "groups")
    assert [[g.id for g in page] for page in pages] == [[team.id, other.id], [more[0].id, more[1].id]]
    assert [g.name for page in pages for g in page] == ["team", "other", "g1", "g2"]


def test_a_user_is_in_at_most_the_cap_of_groups(server: RunningServer) -> None:
    user_id = new_user(server, "joiner")
    groups = [new_group(server, f"group {n}") for n in range(MAX_GROUPS_PER_USER + 1)]
    for group in groups[:MAX_GROUPS_PER_USER]:
        add(server, group.id, user_id)
    full = rpc_error(server.stub.AddGroupMember, gpb.AddGroupMemberRequest(group_id=groups[-1].id, user_id=user_id))
    assert (full.code(), error_info(full).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOO_MANY_GROUPS")
    assert not server.stub.ListGroupMembers(gpb.ListGroupMembersRequest(group_id=groups[-1].id)).members
    server.stub.RemoveGroupMember(gpb.RemoveGroupMemberRequest(group_id=groups[0].id, user_id=user_id))
    add(server, groups[-1].id, user_id)


def test_only_admins_write_and_a_user_sees_only_their_own_groups(server: RunningServer, mail: MailSink) -> None:
    jane = signed_up(server, mail, "jane")
    bob_id = new_user(server, "bob")
    team = new_group(server, "team")
    add(server, team.id, jane.user.id)
    add(server, team.id, bob_id)
    as_jane = server.stub_for(jane.access_token)

    mine = as_jane.ListUserGroups(gpb.ListUserGroupsRequest(user_id=jane.user.id)).groups
    assert [g.id for g in mine] == [team.id]
    refused = {
        "ListUserGroups": gpb.ListUserGroupsRequest(user_id=bob_id),
        "ListGroups": gpb.ListGroupsRequest(),
        "ListGroupMembers": gpb.ListGroupMembersRequest(group_id=team.id),
        "CreateGroup": gpb.CreateGroupRequest(name="mine"),
        "RenameGroup": gpb.RenameGroupRequest(group_id=team.id, name="mine"),
        "DeleteGroup": gpb.DeleteGroupRequest(group_id=team.id),
        "AddGroupMember": gpb.AddGroupMemberRequest(group_id=team.id, user_id=jane.user.id),
        "RemoveGroupMember": gpb.RemoveGroupMemberRequest(group_id=team.id, user_id=bob_id),
    }
    for method, request in refused.items():
        assert rpc_error(getattr(as_jane, method), request).code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert rpc_error(getattr(server.anonymous, method), request).code() == grpc.StatusCode.UNAUTHENTICATED
    # Nothing a refused call asked for happened.
    members = server.stub.ListGroupMembers(gpb.ListGroupMembersRequest(group_id=team.id)).members
    assert sorted(m.user_id for m in members) == sorted([jane.user.id, bob_id])
    assert [g.name for g in server.stub.ListGroups(gpb.ListGroupsRequest()).groups] == ["team"]


def test_the_next_access_token_carries_the_groups_claim(server: RunningServer, mail: MailSink) -> None:
    jane = signed_up(server, mail, "jane")
    assert groups_claim(jane.access_token) is None  # no groups, no claim
    first, second = sorted((new_group(server, "first"), new_group(server, "second")), key=lambda g: g.id)
    add(server, first.id, jane.user.id)
    add(server, second.id, jane.user.id)

    refreshed = refresh(server, jane.refresh_token)
    assert groups_claim(refreshed.access_token) == [first.id, second.id]
    validated = server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=refreshed.access_token)).claims
    assert list(validated.groups) == [first.id, second.id]
    # The token issued before the change keeps what it said; it still works.
    assert not server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=jane.access_token)).claims.groups

    server.stub.RemoveGroupMember(gpb.RemoveGroupMemberRequest(group_id=first.id, user_id=jane.user.id))
    refreshed = refresh(server, refreshed.refresh_token)
    assert groups_claim(refreshed.access_token) == [second.id]
    # A deleted group leaves the next token at once, before housekeeping sweeps its memberships.
    server.stub.DeleteGroup(gpb.DeleteGroupRequest(group_id=second.id))
    refreshed = refresh(server, refreshed.refresh_token)
    assert groups_claim(refreshed.access_token) is None
    assert not server.stub.ListUserGroups(gpb.ListUserGroupsRequest(user_id=jane.user.id)).groups


def test_membership_changes_reach_the_change_feed_and_the_audit_trail(server: RunningServer) -> None:
    user_id = new_user(server, "ann")
    team = new_group(server, "team")
    add(server, team.id, user_id)
    server.stub.RemoveGroupMember(gpb.RemoveGroupMemberRequest(group_id=team.id, user_id=user_id))
    server.stub.RenameGroup(gpb.RenameGroupRequest(group_id=team.id, name="crew"))
    server.stub.DeleteGroup(gpb.DeleteGroupRequest(group_id=team.id))

    changes = watch_until(server.stub, "", lambda seen: sum(c.user_id == user_id for c in seen) == 3, timeout=30)
    mine = [c for c in changes if c.user_id == user_id]
    assert [(c.type, c.group_id, c.user_change_number) for c in mine] == [
        (T.USER_CHANGE_TYPE_CREATED, "", 1),
        (T.USER_CHANGE_TYPE_GROUP_MEMBER_ADDED, team.id, 2),
        (T.USER_CHANGE_TYPE_GROUP_MEMBER_REMOVED, team.id, 3),
    ]
    assert mine[1].user.username == "ann"

    events = server.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(
            types=[
                pb.AUDIT_EVENT_TYPE_GROUP_CREATE,
                pb.AUDIT_EVENT_TYPE_GROUP_RENAME,
                pb.AUDIT_EVENT_TYPE_GROUP_DELETE,
                pb.AUDIT_EVENT_TYPE_GROUP_MEMBER_ADD,
                pb.AUDIT_EVENT_TYPE_GROUP_MEMBER_REMOVE,
            ]
        )
    ).audit_events
    recorded = [(e.type, e.subject_id, e.note, e.actor.id) for e in reversed(events)]  # oldest first
    assert recorded == [
        (pb.AUDIT_EVENT_TYPE_GROUP_CREATE, team.id, "", server.admin_id),
        (pb.AUDIT_EVENT_TYPE_GROUP_MEMBER_ADD, user_id, f"group {team.id}", server.admin_id),
        (pb.AUDIT_EVENT_TYPE_GROUP_MEMBER_REMOVE, user_id, f"group {team.id}", server.admin_id),
        (pb.AUDIT_EVENT_TYPE_GROUP_RENAME, team.id, "", server.admin_id),
        (pb.AUDIT_EVENT_TYPE_GROUP_DELETE, team.id, "", server.admin_id),
    ]


def test_a_deleted_group_leaves_no_membership_once_swept(server: RunningServer, database: Any) -> None:
    users = sorted(new_user(server, name) for name in ("ann", "bob", "cyd"))
    team, kept = new_group(server, "team"), new_group(server, "kept")
    for user_id in users:
        add(server, team.id, user_id)
    add(server, kept.id, users[0])
    cursor = watch_until(server.stub, "", lambda seen: sum(c.user_id in users for c in seen) == 7)[-1].cursor

    server.stub.DeleteGroup(gpb.DeleteGroupRequest(group_id=team.id))
    # Marked, gone for every call; the memberships wait for housekeeping.
    assert database.group_members.count_documents({"group_id": ObjectId(team.id)}) == 3
    purged = server.call(server.app.services.housekeeping.run_once())
    assert purged is not None
    assert purged.group_members == 3
    assert database.group_members.count_documents({"group_id": ObjectId(team.id)}) == 0
    assert database.groups.count_documents({"_id": ObjectId(team.id)}) == 0
    # Other groups keep theirs; a second sweep finds nothing to do.
    assert database.group_members.count_documents({"group_id": ObjectId(kept.id)}) == 1
    again = server.call(server.app.services.housekeeping.run_once())
    assert again is not None
    assert again.group_members == 0

    removed = watch_until(server.stub, cursor, lambda seen: len(seen) == 3)
    assert sorted((c.user_id, c.type, c.group_id) for c in removed) == [
        (user_id, T.USER_CHANGE_TYPE_GROUP_MEMBER_REMOVED, team.id) for user_id in users
    ]


def test_a_deleted_user_leaves_no_membership(server: RunningServer, database: Any) -> None:
    user_id, other_id = new_user(server, "ann"), new_user(server, "bob")
    groups = [new_group(server, name) for name in ("one", "two")]
    for group in groups:
        add(server, group.id, user_id)
        add(server, group.id, other_id)
    assert database.group_members.count_documents({"user_id": ObjectId(user_id)}) == 2

    server.stub.DeleteUser(pb.DeleteUserRequest(id=user_id))
    assert database.group_members.count_documents({"user_id": ObjectId(user_id)}) == 0
    for group in groups:
        members = server.stub.ListGroupMembers(gpb.ListGroupMembersRequest(group_id=group.id)).members
        assert [m.user_id for m in members] == [other_id]
    # And a deleted user cannot be added back.
    gone = rpc_error(server.stub.AddGroupMember, gpb.AddGroupMemberRequest(group_id=groups[0].id, user_id=user_id))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert database.group_members.count_documents({"user_id": ObjectId(user_id)}) == 0
