"""Every query on an index: each filter the servers send is served by one of the indexes the
repository creates (issue 10). MongoDB would scan a whole collection for any other, and nothing
else here would notice.

The check covers every filtering command (find, update, delete, findAndModify, count, distinct,
and an aggregate's first $match) that any test's server sent in this session: run with the whole
suite, that is every query the end-to-end tests exercise. Run alone, this module still sends a
flow through the main calls first.
"""

from __future__ import annotations

import pytest

from tests.support.calls import PASSWORD, create_request
from tests.support.commands import CommandRecorder, Query, created_indexes, queries_of, served
from tests.support.mail import MailSink
from tests.support.servers import RunningServer
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb

# Reads of a whole collection, by design (collection, command, the filter's top-level fields), and why.
# docs/benchmarks.md lists them. Anything else unserved fails.
WHOLE_COLLECTION_READS = {
    ("users", "aggregate", ()): "ListUsers' total_size with no filter counts every user: O(users) anywhere",
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
    server.stub.ListUsers(pb.ListUsersRequest(page_size=1))
    server.stub.ListUsers(pb.ListUsersRequest(role=user_pb2.ROLE_USER, prefix="ja"))
    server.stub.ListUsers(pb.ListUsersRequest(external_id="00u1"))
    server.stub.LockUser(pb.LockUserRequest(user_id=jane.user.id))
    server.stub.UnlockUser(pb.UnlockUserRequest(user_id=jane.user.id))
    server.stub.DeactivateUser(pb.DeactivateUserRequest(user_id=jane.user.id))
    server.stub.ReactivateUser(pb.ReactivateUserRequest(user_id=jane.user.id))
    server.stub.RevokeAllSessions(pb.RevokeAllSessionsRequest(user_id=jane.user.id))
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
