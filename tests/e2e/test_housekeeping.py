"""Housekeeping through real servers on one database, with a clock the tests move: accounts never
activated free their names (finding 11), ended sessions and failed mail go (findings 16 and 15),
and one replica at a time does it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from pymongo import MongoClient

from tests.support.calls import PASSWORD, create_request, refresh, refresh_status, rpc_error, signed_up, wait_until
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import ADMIN_PASSWORD, RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users_grpc.services.housekeeping import JOB, Purged

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DAY = 86400
# Long enough that the background loop runs only at start: the tests run housekeeping themselves.
QUIET = {"housekeeping_interval_seconds": 3600}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def housekeep(server: RunningServer) -> Purged | None:
    """One round of this replica's housekeeping: what it purged, or None if another replica holds the lease."""
    return server.call(server.app.services.housekeeping.run_once())


def admin(server: RunningServer) -> Any:
    """An admin stub with a fresh access token (the clock may have moved past the first one's expiry)."""
    signed_in = server.anonymous.Authenticate(
        pb.AuthenticateRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
    )
    return server.stub_for(signed_in.access_token)


def collection(server: RunningServer, mongodb_uri: str, name: str) -> list[dict[str, Any]]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        return list(client[server.settings.mongodb_database][name].find())


def test_accounts_never_activated_are_purged_and_free_their_username_and_email(
    start_server: StartServer, mail: MailSink, clock: FakeClock
) -> None:
    server = start_server(clock=clock, **QUIET)
    retention = server.settings.unactivated_account_retention_seconds
    idle = server.anonymous.CreateUser(create_request(username="idle", email="idle@example.com")).user
    active = signed_up(server, mail).user  # registered and activated at the same moment

    clock.advance(seconds=retention - 60)
    early = housekeep(server)
    assert early is not None
    assert (early.sessions, early.accounts, early.mails) == (0, 0, 0)
    assert admin(server).GetUser(pb.GetUserRequest(id=idle.id)).user.username == "idle"
    taken = rpc_error(server.anonymous.CreateUser, create_request(username="idle", email="other@example.com"))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS

    clock.advance(seconds=120)
    purged = housekeep(server)
    assert purged is not None
    assert purged.accounts == 1
    stub = admin(server)
    assert rpc_error(stub.GetUser, pb.GetUserRequest(id=idle.id)).code() == grpc.StatusCode.NOT_FOUND
    assert stub.GetUser(pb.GetUserRequest(id=active.id)).user.is_active
    # Username and email are free: a new registration with both succeeds, as a new account.
    again = server.anonymous.CreateUser(create_request(username="idle", email="idle@example.com")).user
    assert again.id != idle.id
    code = mail.code_for("idle@example.com", nth=2)
    assert server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="idle", code=code)).user.id == again.id


def test_ended_sessions_are_purged_after_the_retention(
    start_server: StartServer, mail: MailSink, clock: FakeClock, mongodb_uri: str
) -> None:
    server = start_server(clock=clock, **QUIET)
    retention = server.settings.session_retention_seconds
    kept = signed_up(server, mail)
    revoked = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    server.anonymous.RevokeSession(pb.RevokeSessionRequest(refresh_token=revoked.refresh_token))

    def stored_ids() -> set[str]:
        return {str(s["_id"]) for s in collection(server, mongodb_uri, "sessions")}

    clock.advance(seconds=retention - 1)
    housekeep(server)
    assert {kept.session_id, revoked.session_id} <= stored_ids()
    clock.advance(seconds=2)
    housekeep(server)
    assert revoked.session_id not in stored_ids()
    # The live session is untouched, and still refreshes.
    assert kept.session_id in stored_ids()
    token = refresh(server, kept.refresh_token).refresh_token

    # Once expired (a second ago, here), it is kept for the retention too, then purged.
    clock.advance(seconds=server.settings.session_ttl_seconds - retention)
    assert refresh_status(server, token) == UNAUTHENTICATED
    housekeep(server)
    assert kept.session_id in stored_ids()
    clock.advance(seconds=retention)
    housekeep(server)
    assert kept.session_id not in stored_ids()


def test_failed_mail_is_dropped_by_the_background_loop_after_the_retention(
    start_server: StartServer, clock: FakeClock, mongodb_uri: str, dead_smtp_port: int
) -> None:
    """A mail given up (the relay is down, one attempt allowed) stays for the retention, then goes;
    here the server's own housekeeping loop does it."""
    server = start_server(clock=clock, smtp_port=dead_smtp_port, mail_max_attempts=1, housekeeping_interval_seconds=1)
    server.anonymous.CreateUser(create_request())
    wait_until(
        lambda: [m["status"] for m in collection(server, mongodb_uri, "outbox")] == ["failed"], what="a failed mail"
    )
    clock.advance(seconds=server.settings.mail_failed_retention_seconds - 60)
    housekeep(server)
    assert len(collection(server, mongodb_uri, "outbox")) == 1
    clock.advance(seconds=120)
    wait_until(lambda: collection(server, mongodb_uri, "outbox") == [], what="the failed mail dropped")


def test_one_replica_at_a_time_runs_housekeeping(start_server: StartServer, clock: FakeClock, mongodb_uri: str) -> None:
    replicas = [start_server(clock=clock, **QUIET), start_server(clock=clock, **QUIET)]
    clock.advance(seconds=2 * 3600)  # past the leases taken at start
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            rounds = list(pool.map(housekeep, replicas, timeout=150))
        # Racing for the lease, exactly one runs; the lease names it.
        assert sum(r is not None for r in rounds) == 1
        winner, loser = (replicas[0], replicas[1]) if rounds[0] is not None else (replicas[1], replicas[0])
        [lease] = [lease for lease in collection(winner, mongodb_uri, "leases") if lease["_id"] == JOB]
        assert lease["holder"] == winner.app.services.housekeeping.holder
        # While the lease runs, the other replica does not run, however often it tries.
        clock.advance(seconds=3599)
        assert housekeep(loser) is None
        clock.advance(seconds=2)
        assert housekeep(loser) is not None
        clock.advance(seconds=3601)
