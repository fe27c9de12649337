"""Every query on an index: each filter the servers send is served by one of the indexes the
repository creates (issue 10). MongoDB would scan a whole collection for any other, and nothing
else here would notice.

The check covers every filtering command (find, update, delete, findAndModify, count, distinct,
and an aggregate's first $match) that any test's server sent in this session: run with the whole
suite, that is every query the end-to-end tests exercise. Run alone, this module still sends a
flow through the main calls first.
"""

from __future__ import annotations

import grpc
import pytest

from tests.support.calls import PASSWORD, create_request
from tests.support.commands import CommandRecorder, Query, constrained_fields, created_indexes, queries_of, served
from tests.support.mail import MailSink
from tests.support.servers import RunningServer
from users.v1 import group_pb2 as gpb
from users.v1 import metadata_pb2 as md
from users.v1 import service_account_token_pb2 as tpb
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb

# Reads of a whole collection, by design (collection, command, the filter's top-level fields), and why.
# docs/benchmarks.md lists them. Anything else unserved fails.
WHOLE_COLLECTION_READS = {
    ("users", "aggregate", ()): "ListUsers' total_size, asked for with no filter, counts every user: O(users)",
    ("signing_keys", "find", ()): "every signing key is loaded: a handful of documents",
    ("users", "find", ()): "at start, whether any user exists (limit 1); a migration's first batch in _id order",
    ("outbox", "find", ("body",)): "once at start, mail queued before bodies were sealed; mail leaves on delivery",
}


def test_a_flow_through_the_main_calls(server: RunningServer, mail: MailSink) -> None:
    server.anonymous.CreateUser(create_request())
    server.anonymous.ResendActivationCode(pb.ResendActivationCodeRequest(identifier="jane"))
    code = mail.code_for("jane@example.com", 2)
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code))
    jane = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    stub = server.stub_for(jane.access_token)
    stub.GetUser(pb.GetUserRequest(id=jane.user.id))
    server.stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier="jane@example.com"))
    server.stub.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD))
    refreshed = server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=jane.refresh_token))
    stub.ListSessions(pb.ListSessionsRequest(user_id=jane.user.id))
    server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=jane.access_token))
    server.anonymous.RevokeSession(pb.RevokeSessionRequest(refresh_token=refreshed.refresh_token))
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    # With their counts (total_size only when asked for), whose filters are checked as the pages' are.
    server.stub.ListUsers(pb.ListUsersRequest(page_size=1, include_total_size=True))
    server.stub.ListUsers(pb.ListUsersRequest(role=user_pb2.ROLE_USER, prefix="ja", include_total_size=True))
    tenant = md.SetUserMetadataRequest(user_id=jane.user.id, scope=md.METADATA_SCOPE_ADMIN, key="tenant", value=b"acme")
    server.stub.SetUserMetadata(tenant)
    stub.ListUserMetadata(md.ListUserMetadataRequest(user_id=jane.user.id))
    acme = md.MetadataFilter(scope=md.METADATA_SCOPE_ADMIN, key="tenant", value=b"acme")
    first = server.stub.ListUsers(pb.ListUsersRequest(page_size=1, metadata=acme, include_total_size=True))
    server.stub.ListUsers(pb.ListUsersRequest(page_size=1, metadata=acme, page_token=first.next_page_token))
    present = md.MetadataFilter(scope=md.METADATA_SCOPE_ADMIN, key="tenant")
    server.stub.ListUsers(
        pb.ListUsersRequest(metadata=present, state=user_pb2.USER_STATE_ACTIVE, include_total_size=True)
    )
    server.stub.DeleteUserMetadata(
        md.DeleteUserMetadataRequest(user_id=jane.user.id, scope=md.METADATA_SCOPE_ADMIN, key="tenant")
    )
    server.stub.ListUsers(pb.ListUsersRequest(external_id="00u1", include_total_size=True))
    server.stub.LockUser(pb.LockUserRequest(user_id=jane.user.id))
    server.stub.UnlockUser(pb.UnlockUserRequest(user_id=jane.user.id))
    server.stub.DeactivateUser(pb.DeactivateUserRequest(user_id=jane.user.id))
    server.stub.ReactivateUser(pb.ReactivateUserRequest(user_id=jane.user.id))
    server.stub.RevokeAllSessions(pb.RevokeAllSessionsRequest(user_id=jane.user.id))
    group = server.stub.CreateGroup(gpb.CreateGroupRequest(name="team")).group
    server.stub.RenameGroup(gpb.RenameGroupRequest(group_id=group.id, name="crew"))
    server.stub.AddGroupMember(gpb.AddGroupMemberRequest(group_id=group.id, user_id=jane.user.id))
    server.stub.ListGroups(gpb.ListGroupsRequest(page_size=1))
    server.stub.ListGroupMembers(gpb.ListGroupMembersRequest(group_id=group.id, page_size=1))
    server.stub.ListUserGroups(gpb.ListUserGroupsRequest(user_id=jane.user.id, page_size=1))
    server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))  # the groups claim
    server.stub.RemoveGroupMember(gpb.RemoveGroupMemberRequest(group_id=group.id, user_id=jane.user.id))
    server.stub.AddGroupMember(gpb.AddGroupMemberRequest(group_id=group.id, user_id=jane.user.id))
    server.stub.DeleteGroup(gpb.DeleteGroupRequest(group_id=group.id))
    server.call(server.app.services.groups.sweep_deleted())
    kept = server.stub.CreateGroup(gpb.CreateGroupRequest(name="kept")).group
    server.stub.AddGroupMember(gpb.AddGroupMemberRequest(group_id=kept.id, user_id=jane.user.id))
    # A service account's long-lived token: made, used, listed, revoked, refused; the account deleted.
    account = server.stub.CreateServiceAccount(pb.CreateServiceAccountRequest(name="scim")).service_account
    made = server.stub.CreateServiceAccountToken(
        tpb.CreateServiceAccountTokenRequest(service_account_id=account.client_id, display_name="okta")
    )
    server.stub_for(made.token).GetUser(pb.GetUserRequest(id=jane.user.id))
    server.stub.ListServiceAccountTokens(tpb.ListServiceAccountTokensRequest(service_account_id=account.client_id))
    server.stub.RevokeServiceAccountToken(
        tpb.RevokeServiceAccountTokenRequest(
            service_account_id=account.client_id, token_id=made.service_account_token.id
        )
    )
    with pytest.raises(grpc.RpcError):
        server.stub_for(made.token).GetUser(pb.GetUserRequest(id=jane.user.id))
    server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=account.client_id))
    server.stub.DeleteUserByIdentifier(pb.DeleteUserByIdentifierRequest(identifier="jane"))


@pytest.mark.after_the_suite
def test_every_query_the_suite_sent_is_served_by_an_index(suite_queries: CommandRecorder) -> None:
    commands = suite_queries.commands
    indexes = created_indexes(commands)
    queries = [query for command in commands for query in queries_of(command)]
    assert queries, "no server sent a query"
    unserved: dict[tuple[str, str, str], Query] = {}
    for query in queries:
        by_design = (query.collection, query.command, tuple(sorted(query.filter))) in WHOLE_COLLECTION_READS
        if not by_design and not served(query, indexes.get(query.collection, set())):
            unserved.setdefault((query.collection, query.command, repr(sorted(query.filter))), query)
    assert not unserved, "\n".join(f"{q.collection} {q.command} {q.filter!r} sort {q.sort}" for q in unserved.values())


def test_list_users_by_metadata_walks_a_metadata_index_in_id_order(
    server: RunningServer, suite_queries: CommandRecorder
) -> None:
    """Every users query carries ``deleting: None``, which the check above counts as served by the
    sparse ``deleting`` index, though MongoDB would not use a sparse index for a null match: so
    the metadata filters are held to their own indexes here, each with ``_id`` next (the keyset's
    order, so a page reads only its own users). The test sends both filters itself: under xdist,
    the flow above may run in the other worker."""
    acme = md.MetadataFilter(scope=md.METADATA_SCOPE_ADMIN, key="tenant", value=b"acme")
    server.stub.ListUsers(pb.ListUsersRequest(page_size=1, metadata=acme))
    server.stub.ListUsers(pb.ListUsersRequest(metadata=md.MetadataFilter(scope=md.METADATA_SCOPE_ADMIN, key="tenant")))
    commands = suite_queries.commands
    indexes = created_indexes(commands).get("users", set())
    queries = [query for command in commands for query in queries_of(command) if query.collection == "users"]
    named = {field for query in queries for fields in constrained_fields(query.filter) for field in fields}
    metadata_fields = {field for field in named if field.startswith("metadata.")}
    assert metadata_fields == {"metadata.sk", "metadata.skv"}, "the flow above sends both"
    for field in metadata_fields:
        assert (field, "_id") in indexes, field
