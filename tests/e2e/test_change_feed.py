"""WatchUserChanges through real channels on the real database: every kind of change with its
fields, resuming by cursor while two server processes write at once, expired cursors,
changes that a crash left pending, published by the sweep, and streams ended once their caller
is revoked."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from bson import ObjectId
from google.protobuf.field_mask_pb2 import FieldMask
from pymongo import MongoClient

from tests.support.calls import (
    PASSWORD,
    ServeProcess,
    create_request,
    create_service_account,
    error_info,
    issue_service_token,
    new_admin,
    retry_delay,
    rpc_error,
    wait_until,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import ADMIN_PASSWORD, BearerToken, RunningServer, StartServer
from users.v1 import service_account_token_pb2 as tpb
from users.v1 import user_pb2, user_service_pb2_grpc
from users.v1 import user_service_pb2 as pb
from users_grpc.services.changes import cursor_of

Stub = user_service_pb2_grpc.UserServiceStub
T = pb.UserChangeType


def watch(stub: Stub, after: str, count: int, timeout: float = 30) -> list[pb.UserChange]:
    """The first ``count`` changes after ``after``; the stream is then closed."""
    stream = stub.WatchUserChanges(pb.WatchUserChangesRequest(after=after), timeout=timeout)
    changes: list[pb.UserChange] = []
    try:
        for response in stream:
            changes.append(response.change)
            if len(changes) == count:
                break
    finally:
        stream.cancel()
    assert len(changes) == count, f"{len(changes)} of {count} changes"
    return changes


def watch_until(stub: Stub, after: str, done: Any, timeout: float = 30) -> list[pb.UserChange]:
    """Changes after ``after`` until ``done(changes)`` holds."""
    stream = stub.WatchUserChanges(pb.WatchUserChangesRequest(after=after), timeout=timeout)
    changes: list[pb.UserChange] = []
    try:
        for response in stream:
            changes.append(response.change)
            if done(changes):
                return changes
    finally:
        stream.cancel()
    raise AssertionError(f"the stream ended after {len(changes)} changes")


@pytest.fixture
def database(server: RunningServer) -> Iterator[Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri, tz_aware=True)
    with client:
        yield client[server.settings.mongodb_database]


def test_every_kind_of_change_appears_with_its_fields(server: RunningServer, mail: MailSink) -> None:
    stub = server.stub
    created = stub.CreateUser(create_request()).user
    stub.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com")))
    stub.UpdateUser(
        pb.UpdateUserRequest(
            user_id=created.id, user=user_pb2.User(first_name="Janet"), update_mask=FieldMask(paths=["first_name"])
        )
    )
    stub.SetUserEmail(pb.SetUserEmailRequest(user_id=created.id, email="janet@example.com"))
    stub.SetUserRole(pb.SetUserRoleRequest(user_id=created.id, role=user_pb2.ROLE_ADMIN))
    stub.LockUser(pb.LockUserRequest(user_id=created.id))
    stub.UnlockUser(pb.UnlockUserRequest(user_id=created.id))
    stub.DeactivateUser(pb.DeactivateUserRequest(user_id=created.id))
    stub.ReactivateUser(pb.ReactivateUserRequest(user_id=created.id))
    stub.DeleteUser(pb.DeleteUserRequest(id=created.id))

    # From the start: the server's own admin first, then jane's changes. Deleting an active admin
    # deactivates her first (so the admins left can be counted): that is a change too.
    changes = watch(stub, "", 12)
    assert changes[0].user_id == server.admin_id
    assert changes[0].type == T.USER_CHANGE_TYPE_CREATED
    janes = changes[1:]
    assert {c.user_id for c in janes} == {created.id}
    assert [c.type for c in janes] == [
        T.USER_CHANGE_TYPE_CREATED,
        T.USER_CHANGE_TYPE_ACTIVATED,
        T.USER_CHANGE_TYPE_UPDATED,
        T.USER_CHANGE_TYPE_EMAIL_CHANGED,
        T.USER_CHANGE_TYPE_ROLE_CHANGED,
        T.USER_CHANGE_TYPE_LOCKED,
        T.USER_CHANGE_TYPE_UNLOCKED,
        T.USER_CHANGE_TYPE_DEACTIVATED,
        T.USER_CHANGE_TYPE_REACTIVATED,
        T.USER_CHANGE_TYPE_DEACTIVATED,
        T.USER_CHANGE_TYPE_DELETED,
    ]
    assert [c.user_change_number for c in janes] == list(range(1, 12))
    assert len({c.cursor for c in changes}) == 12
    assert all(c.change_time.ToDatetime(UTC) > datetime(2020, 1, 1, tzinfo=UTC) for c in changes)
    users = [c.user for c in janes]
    assert (users[0].username, users[0].state) == ("jane", user_pb2.USER_STATE_PENDING_ACTIVATION)
    assert users[1].state == user_pb2.USER_STATE_ACTIVE
    assert users[2].first_name == "Janet"
    assert users[3].email == "janet@example.com"
    assert users[4].role == user_pb2.ROLE_ADMIN
    assert users[5].state == user_pb2.USER_STATE_LOCKED
    assert users[6].state == user_pb2.USER_STATE_ACTIVE
    assert users[7].state == user_pb2.USER_STATE_DEACTIVATED
    assert users[8].state == user_pb2.USER_STATE_ACTIVE
    # A deletion carries the id only.
    assert not janes[10].HasField("user")
    # Resuming after a cursor gives exactly what follows it.
    assert [c.cursor for c in watch(stub, janes[4].cursor, 6)] == [c.cursor for c in janes[5:]]


def test_who_may_watch_and_bad_cursors(server: RunningServer, mail: MailSink) -> None:
    error = rpc_error(lambda r: list(server.anonymous.WatchUserChanges(r, timeout=10)), pb.WatchUserChangesRequest())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    server.stub.CreateUser(create_request())
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com")))
    token = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD)).access_token
    error = rpc_error(
        lambda r: list(server.stub_for(token).WatchUserChanges(r, timeout=10)), pb.WatchUserChangesRequest()
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    for garbage in ("nonsense", cursor_of(1) + "A", "AAAA"):
        request = pb.WatchUserChangesRequest(after=garbage)
        error = rpc_error(lambda r: list(server.stub.WatchUserChanges(r, timeout=10)), request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
    # A cursor this feed never handed out (from a newer backup, say) is refused, not waited on.
    request = pb.WatchUserChangesRequest(after=cursor_of(1000))
    error = rpc_error(lambda r: list(server.stub.WatchUserChanges(r, timeout=10)), request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "CHANGE_CURSOR_EXPIRED"


def test_a_cursor_older_than_the_changes_kept_is_refused(start_server: StartServer) -> None:
    clock = FakeClock(datetime.now(UTC))
    server = start_server(clock=clock, change_retention_days=1)
    for n in range(3):
        server.stub.CreateUser(create_request(username=f"user{n}", email=f"user{n}@example.com"))
    changes = watch(server.stub, "", 4)
    # Two days on, with one day kept, housekeeping's purge takes every change published so far.
    # (The clock moves only now: the server's own housekeeping, run as it starts, must find
    # nothing to purge, or it would race the changes made above.)
    clock.advance(days=2)
    signed_in = server.anonymous.Authenticate(
        pb.AuthenticateRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
    )
    admin = server.stub_for(signed_in.access_token)  # the first token has expired
    purged = server.call(server.app.services.housekeeping.run_once())
    assert purged is not None
    # All but the newest: the sequence never starts over.
    assert purged.changes == 3
    for old in changes[:2]:
        request = pb.WatchUserChangesRequest(after=old.cursor)
        error = rpc_error(lambda r: list(admin.WatchUserChanges(r, timeout=10)), request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(error).reason == "CHANGE_CURSOR_EXPIRED"
        assert "ListUsers" in (error.details() or "")
    # Right before the oldest change kept: nothing is missing, so the stream goes on.
    assert [c.cursor for c in watch(admin, changes[2].cursor, 1)] == [changes[3].cursor]
    # An empty cursor starts at the oldest change kept.
    assert [c.cursor for c in watch(admin, "", 1)] == [changes[3].cursor]


def test_changes_a_crash_left_pending_are_published_by_the_sweep(
    start_server: StartServer, mail: MailSink, tmp_path: Path
) -> None:
    server = start_server(change_poll_seconds=0.1)
    jane = server.stub.CreateUser(create_request()).user
    bob = server.stub.CreateUser(create_request(username="bob", email="bob@example.com")).user
    mail.wait_for("bob@example.com")
    start = watch(server.stub, "", 3)
    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri, tz_aware=True)
    users = client[server.settings.mongodb_database].users
    long_ago = datetime.now(UTC) - timedelta(minutes=1)
    # What a server that died right after its update leaves: the change made, its entry pending.
    users.update_one(
        {"_id": ObjectId(jane.id)},
        {
            "$set": {"first_name": "Crashed"},
            "$inc": {"change_number": 1},
            "$push": {"pending_changes": {"id": ObjectId(), "type": "updated", "at": long_ago}},
            "$min": {"pending_changes_since": long_ago},
        },
    )
    # A deletion marked but neither published nor finished, a security notice still in the document.
    notice = {"id": ObjectId(), "to": "bob@example.com", "subject": "Your password was changed", "body": "Hello"}
    users.update_one(
        {"_id": ObjectId(bob.id)},
        {
            "$set": {"deleting": long_ago, "pending_mail": [notice], "pending_mail_since": long_ago},
            "$inc": {"change_number": 1},
            "$push": {"pending_changes": {"id": ObjectId(), "type": "deleted", "at": long_ago}},
            "$min": {"pending_changes_since": long_ago},
        },
    )
    swept = {c.user_id: c for c in watch(server.stub, start[-1].cursor, 2)}
    assert swept[jane.id].type == T.USER_CHANGE_TYPE_UPDATED
    assert swept[jane.id].user_change_number == 2
    assert swept[jane.id].user.first_name == "Crashed"
    assert swept[bob.id].type == T.USER_CHANGE_TYPE_DELETED
    assert swept[bob.id].user_change_number == 2
    # The deletion is finished, and the notice went to the outbox first, and out.
    assert mail.wait_for("bob@example.com", 2)[1]["Subject"] == "Your password was changed"
    wait_until(lambda: users.find_one({"_id": ObjectId(bob.id)}) is None, what="the deletion finished")
    assert users.find_one({"_id": ObjectId(jane.id)}, {"pending_changes": 1}) == {"_id": ObjectId(jane.id)}
    client.close()


def test_two_processes_write_while_a_consumer_resumes_three_times_and_sees_each_change_once(
    server: RunningServer, tmp_path: Path
) -> None:
    """The issue's test: two server processes on one database apply 500 changes at once (50 users,
    each created, updated, promoted, demoted, locked, unlocked, deactivated, reactivated, given a
    new email and deleted, its steps alternating between the processes), while a consumer reads,
    disconnects and resumes from its last cursor three times, each time on the other process."""
    env = {
        "USERS_MONGODB_URI": server.settings.mongodb_uri,
        "USERS_MONGODB_DATABASE": server.settings.mongodb_database,
        "USERS_MAIL_DIR": str(tmp_path / "mail"),
        "USERS_BCRYPT_ROUNDS": "10",
        "USERS_CHANGE_POLL_SECONDS": "0.1",
        "USERS_HEALTH_INTERVAL_SECONDS": "1",
    }
    processes = [ServeProcess(**env), ServeProcess(**env)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{process.port()}") for process in processes]
    try:
        stubs = [Stub(grpc.intercept_channel(channel, BearerToken(server.admin_token))) for channel in channels]
        for stub in stubs:
            wait_until(lambda stub=stub: _serving(stub), what="a serving process")  # type: ignore[misc]
        received: list[pb.UserChange] = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            writers = [pool.submit(_history, stubs[n % 2], stubs[(n + 1) % 2], n) for n in range(FEED_USERS)]
            cursor = ""
            for round_ in range(3):
                part = watch(stubs[round_ % 2], cursor, 100, timeout=60)
                received += part
                cursor = part[-1].cursor
            ids = {writer.result() for writer in writers}
        assert len(received) == 300
        received += watch_until(
            stubs[1],
            cursor,
            lambda changes: sum(c.type == T.USER_CHANGE_TYPE_DELETED for c in received + changes) == FEED_USERS,
            timeout=60,
        )
    finally:
        for channel in channels:
            channel.close()
        for process in processes:
            process.close()
    # Exactly once: every cursor once, every (user, number) once; and nothing but these changes.
    assert len({c.cursor for c in received}) == len(received)
    ours = [c for c in received if c.user_id in ids]
    assert len(ours) == FEED_USERS * len(FEED_HISTORY) == 500
    assert {c.user_id for c in received} - ids == {server.admin_id}
    by_user: dict[str, list[pb.UserChange]] = defaultdict(list)
    for change in ours:
        by_user[change.user_id].append(change)
    # In an order consistent with each user's history: numbered 1, 2, 3, ... as made.
    for changes in by_user.values():
        assert [c.user_change_number for c in changes] == list(range(1, len(FEED_HISTORY) + 1))
        assert [c.type for c in changes] == FEED_HISTORY


FEED_USERS = 50
FEED_HISTORY = [
    T.USER_CHANGE_TYPE_CREATED,
    T.USER_CHANGE_TYPE_UPDATED,
    T.USER_CHANGE_TYPE_ROLE_CHANGED,
    T.USER_CHANGE_TYPE_ROLE_CHANGED,
    T.USER_CHANGE_TYPE_LOCKED,
    T.USER_CHANGE_TYPE_UNLOCKED,
    T.USER_CHANGE_TYPE_DEACTIVATED,
    T.USER_CHANGE_TYPE_REACTIVATED,
    T.USER_CHANGE_TYPE_EMAIL_CHANGED,
    T.USER_CHANGE_TYPE_DELETED,
]


def _history(one: Stub, other: Stub, n: int) -> str:
    """FEED_HISTORY for one user, its steps alternating between the two processes; the user's id."""
    imported = one.ImportUsers(
        pb.ImportUsersRequest(
            users=[
                pb.ImportedUser(
                    username=f"feed{n}",
                    first_name="F",
                    last_name="L",
                    email=f"feed{n}@example.com",
                    email_verified=True,
                )
            ]
        )
    )
    user_id = imported.results[0].user.id
    assert user_id, imported
    mask = FieldMask(paths=["first_name"])
    other.UpdateUser(pb.UpdateUserRequest(user_id=user_id, user=user_pb2.User(first_name="G"), update_mask=mask))
    one.SetUserRole(pb.SetUserRoleRequest(user_id=user_id, role=user_pb2.ROLE_ADMIN))
    other.SetUserRole(pb.SetUserRoleRequest(user_id=user_id, role=user_pb2.ROLE_USER))
    one.LockUser(pb.LockUserRequest(user_id=user_id))
    other.UnlockUser(pb.UnlockUserRequest(user_id=user_id))
    one.DeactivateUser(pb.DeactivateUserRequest(user_id=user_id))
    other.ReactivateUser(pb.ReactivateUserRequest(user_id=user_id))
    one.SetUserEmail(pb.SetUserEmailRequest(user_id=user_id, email=f"moved{n}@example.com"))
    other.DeleteUser(pb.DeleteUserRequest(id=user_id))
    return user_id


def _serving(stub: Stub) -> bool:
    try:
        stub.GetPublicKeys(pb.GetPublicKeysRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return True


def stream_admitted(server: RunningServer) -> bool:
    """Whether a new stream of the server's admin is served (its first change arrives), or refused
    for want of a place (RESOURCE_EXHAUSTED); it is closed either way."""
    stream = server.stub.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=10)
    try:
        return next(stream).change.user_id == server.admin_id
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    finally:
        stream.cancel()


def test_streams_past_their_cap_are_refused_at_once_and_unary_calls_go_on(start_server: StartServer) -> None:
    """Each open stream reads the change log at every poll: past USERS_MAX_STREAMS a new one is
    refused OVERLOADED with a retry delay, while unary calls, counted apart, are still served."""
    server = start_server(max_streams=2)
    open_streams = [server.stub.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30) for _ in range(2)]
    for stream in open_streams:
        assert next(stream).change.user_id == server.admin_id  # open and being served
    refused = rpc_error(lambda r: list(server.stub.WatchUserChanges(r, timeout=10)), pb.WatchUserChangesRequest())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(refused).reason == "OVERLOADED"
    assert retry_delay(refused) == 30  # a stream holds its place far longer than a call
    # Only admitted streams are counted: a stranger is refused as one, not as the cap, and never
    # takes a watcher's place.
    stranger = rpc_error(lambda r: list(server.anonymous.WatchUserChanges(r, timeout=10)), pb.WatchUserChangesRequest())
    assert stranger.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.stub.GetUser(pb.GetUserRequest(id=server.admin_id)).user.id == server.admin_id

    open_streams[0].cancel()  # a place frees up once the server has closed that stream
    wait_until(lambda: stream_admitted(server), what="a stream admitted once another closed")
    open_streams[1].cancel()


def test_one_caller_holds_at_most_its_share_of_the_streams(start_server: StartServer, mail: MailSink) -> None:
    """Past USERS_MAX_STREAMS_PER_CALLER a caller's new stream is refused TOO_MANY_STREAMS, though
    the replica has room: one runaway admin or service cannot take every place. Its other sessions
    count with it; another admin is served. With the replica full too, the caller at its share is
    told TOO_MANY_STREAMS (closing its own is what helps), anyone else OVERLOADED."""
    server = start_server(max_streams=2, max_streams_per_caller=1)

    def refusal(stub: Any) -> str:
        refused = rpc_error(lambda r: list(stub.WatchUserChanges(r, timeout=10)), pb.WatchUserChangesRequest())
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay(refused) == 30
        reason: str = error_info(refused).reason
        return reason

    held = server.stub.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)
    try:
        assert next(held).change.user_id == server.admin_id
        again = server.anonymous.Authenticate(
            pb.AuthenticateRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
        )
        for stub in (server.stub, server.stub_for(again.access_token)):  # the same admin, either session
            assert refusal(stub) == "TOO_MANY_STREAMS"
        other = server.stub_for(new_admin(server, mail).access_token)
        theirs = other.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)
        try:
            assert next(theirs).change.user_id == server.admin_id
            # Full now: the first admin still hears of its share, a third admin of the replica.
            assert refusal(server.stub) == "TOO_MANY_STREAMS"
            assert refusal(server.stub_for(new_admin(server, mail, "cyd").access_token)) == "OVERLOADED"
        finally:
            theirs.cancel()
    finally:
        held.cancel()
    wait_until(lambda: stream_admitted(server), what="the admin's stream admitted once its first one closed")


def read_until_created(stream: Any, user_id: str) -> None:
    """Read an open stream up to the change that created ``user_id``: everything before has arrived."""
    for response in stream:
        if response.change.user_id == user_id and response.change.type == T.USER_CHANGE_TYPE_CREATED:
            return
    raise AssertionError("the stream ended before the user's creation arrived")


def first_change_or_end(stream: Any) -> pb.UserChange | grpc.RpcError:
    """The next change a stream delivers, or the error it ends with if it delivers none."""
    try:
        for response in stream:
            change: pb.UserChange = response.change
            return change
    except grpc.RpcError as error:
        return error
    raise AssertionError("the stream ended without a status")


def assert_ends_before_the_next_change(stream: Any, server: RunningServer, revoke: Callable[[], Stub]) -> None:
    """The stream's caller is admitted and the stream read to its end; ``revoke`` takes the
    caller's access away and returns the stub of an admin still admitted, whose change made after
    must not reach the stream: it ends UNAUTHENTICATED or PERMISSION_DENIED, delivering nothing
    more. Either is right: a demotion stores the role before the token version moves (the count
    that keeps an active admin runs between), and a poll in that window still knows the token but
    no longer admits its role."""
    alice = server.stub.CreateUser(create_request(username="alice", email="alice@example.com")).user
    read_until_created(stream, alice.id)
    admin = revoke()
    mask = FieldMask(paths=["first_name"])
    admin.UpdateUser(pb.UpdateUserRequest(user_id=alice.id, user=user_pb2.User(first_name="Alicia"), update_mask=mask))
    outcome = first_change_or_end(stream)
    assert isinstance(outcome, grpc.RpcError), f"delivered after the caller lost access: {outcome}"
    assert outcome.code() in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}, outcome


REVOCATIONS: dict[str, Callable[[Stub, str], object]] = {
    "demoted": lambda stub, user_id: stub.SetUserRole(pb.SetUserRoleRequest(user_id=user_id, role=user_pb2.ROLE_USER)),
    "deactivated": lambda stub, user_id: stub.DeactivateUser(pb.DeactivateUserRequest(user_id=user_id)),
    "locked": lambda stub, user_id: stub.LockUser(pb.LockUserRequest(user_id=user_id)),
    "deleted": lambda stub, user_id: stub.DeleteUser(pb.DeleteUserRequest(id=user_id)),
}


@pytest.mark.parametrize("revocation", REVOCATIONS)
def test_an_admins_stream_ends_once_the_admin_is_revoked(
    server: RunningServer, mail: MailSink, revocation: str
) -> None:
    """Admitted when it opened, a stream is no licence: it is checked again at every poll, by the
    rule that admits a unary call, and ends before delivering any change made after the revocation."""
    bea = new_admin(server, mail)
    stream = server.stub_for(bea.access_token).WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)

    def revoke() -> Stub:
        REVOCATIONS[revocation](server.stub, bea.user.id)
        return server.stub

    try:
        assert_ends_before_the_next_change(stream, server, revoke)
    finally:
        stream.cancel()


def test_a_service_accounts_stream_ends_once_the_account_is_deleted(server: RunningServer) -> None:
    created = create_service_account(server, "billing")
    client_id = created.service_account.client_id
    machine = server.stub_for(issue_service_token(server, client_id, created.client_secret).access_token)
    stream = machine.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)

    def revoke() -> Stub:
        server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=client_id))
        return server.stub

    try:
        assert_ends_before_the_next_change(stream, server, revoke)
    finally:
        stream.cancel()


def test_a_service_account_tokens_stream_ends_once_the_token_is_revoked(server: RunningServer) -> None:
    client_id = create_service_account(server, "scim").service_account.client_id
    made = server.stub.CreateServiceAccountToken(
        tpb.CreateServiceAccountTokenRequest(service_account_id=client_id, display_name="okta")
    )
    stream = server.stub_for(made.token).WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)

    def revoke() -> Stub:
        server.stub.RevokeServiceAccountToken(
            tpb.RevokeServiceAccountTokenRequest(service_account_id=client_id, token_id=made.service_account_token.id)
        )
        return server.stub

    try:
        assert_ends_before_the_next_change(stream, server, revoke)
    finally:
        stream.cancel()


def test_a_stream_ends_once_its_token_expires(start_server: StartServer) -> None:
    """By the server's clock, as for a unary call: a token's expiry ends its stream too."""
    clock = FakeClock(datetime.now(UTC))
    server = start_server(clock=clock)
    stream = server.stub.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)

    def revoke() -> Stub:
        clock.advance(seconds=server.settings.access_token_ttl_seconds + 1)
        signed_in = server.anonymous.Authenticate(
            pb.AuthenticateRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
        )
        return server.stub_for(signed_in.access_token)  # the admin's first token has expired

    try:
        assert_ends_before_the_next_change(stream, server, revoke)
    finally:
        stream.cancel()


def test_an_idle_stream_ends_at_its_next_poll_once_its_caller_is_revoked(start_server: StartServer) -> None:
    """No change has to come for the check: an idle stream is admitted again at each poll too.
    (Deleting a service account is no change of a user, so nothing wakes the stream before.)"""
    server = start_server(change_poll_seconds=0.1)
    created = create_service_account(server, "billing")
    client_id = created.service_account.client_id
    machine = server.stub_for(issue_service_token(server, client_id, created.client_secret).access_token)
    stream = machine.WatchUserChanges(pb.WatchUserChangesRequest(), timeout=30)
    try:
        assert next(stream).change.user_id == server.admin_id  # open and being served
        server.stub.DeleteServiceAccount(pb.DeleteServiceAccountRequest(client_id=client_id))
        outcome = first_change_or_end(stream)
    finally:
        stream.cancel()
    assert isinstance(outcome, grpc.RpcError), f"delivered after the caller lost access: {outcome}"
    assert outcome.code() == grpc.StatusCode.UNAUTHENTICATED, outcome
