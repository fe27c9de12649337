"""Housekeeping's leases and purges, and refresh-token rotation in constant space, against the real
database (FerretDB, or USERS_TEST_MONGODB_URI): stale claims released, never-activated users purged
and published as deleted, however many sweeps it takes, and what a lease records."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import bson
import pytest
from bson import ObjectId

from tests.support.records import new_user
from tests.support.stores import Stores
from users_grpc.adapters.mongo import housekeeping as housekeeping_store
from users_grpc.adapters.mongo.claims import CLAIM_SETTLE_SECONDS, Claim
from users_grpc.adapters.mongo.housekeeping import (
    ended_sessions_queries,
    expired_tallies_query,
    failed_mail_query,
    never_activated_query,
)
from users_grpc.domain.model import ActivationCode, ChangeType, Gender, Mail, NewUser, Role

_T = TypeVar("_T")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)


def dated_user(username: str, *, active: bool, created_at: datetime, pending: bool = True) -> NewUser:
    """A user created at ``created_at``, active or not, with a pending activation unless told."""
    activation = ActivationCode(
        digest="d", expires_at=created_at + timedelta(minutes=15), attempts_left=5, sends_in_window=1,
        window_started_at=created_at,
    )  # fmt: skip
    return NewUser(
        id=str(ObjectId()),
        username=username,
        first_name="A",
        last_name="B",
        email=f"{username}@example.com",
        gender=Gender.UNSPECIFIED,
        role=Role.USER,
        password_hash="$2b$10$hash",
        is_active=active,
        activation=activation if pending and not active else None,
        created_at=created_at,
    )


async def test_imported_users_pending_activation_are_not_purged(stores: Stores) -> None:
    # Imported unverified, then a code was asked for (so an activation is pending), long ago.
    migrant = dataclasses.replace(dated_user("migrant", active=False, created_at=NOW - 30 * DAY), imported=True)
    await stores.users.add(migrant)
    assert await stores.housekeeping.purge_never_activated_users(NOW - 7 * DAY) == 0
    assert await stores.users.get(migrant.id) is not None


async def test_one_holder_at_a_time_takes_a_lease(stores: Stores) -> None:
    leases = stores.housekeeping
    taken = await asyncio.gather(*(leases.take_lease("job", f"replica{n}", NOW, 60) for n in range(10)))
    assert sum(taken) == 1
    winner = f"replica{taken.index(True)}"
    other = "replica-x"
    assert not await leases.take_lease("job", other, NOW + timedelta(seconds=59), 60)
    # Its holder may renew it; another takes it only once it has run out.
    assert await leases.take_lease("job", winner, NOW + timedelta(seconds=30), 60)
    assert not await leases.take_lease("job", other, NOW + timedelta(seconds=89), 60)
    assert await leases.take_lease("job", other, NOW + timedelta(seconds=91), 60)
    assert not await leases.take_lease("job", winner, NOW + timedelta(seconds=92), 60)
    # Jobs lease independently.
    assert await leases.take_lease("another-job", winner, NOW, 60)


async def test_ended_sessions_are_purged_after_the_retention(stores: Stores) -> None:
    sessions = stores.sessions

    async def session(created: datetime, lifetime: timedelta) -> str:
        session_id = sessions.new_id()
        await sessions.create(session_id, "u" * 24, "digest", created, created + lifetime, 0)
        return session_id

    expired_long_ago = await session(NOW - 40 * DAY, 30 * DAY)  # ended NOW - 10 days
    expired_lately = await session(NOW - 31 * DAY, 30 * DAY)  # ended NOW - 1 day
    revoked_long_ago = await session(NOW - 9 * DAY, 30 * DAY)
    await sessions.revoke(revoked_long_ago, NOW - 8 * DAY)
    revoked_lately = await session(NOW - 9 * DAY, 30 * DAY)
    await sessions.revoke(revoked_lately, NOW - 6 * DAY)
    live = await session(NOW - 9 * DAY, 30 * DAY)

    assert await stores.housekeeping.purge_ended_sessions(NOW - 7 * DAY) == 2
    left = {str(d["_id"]) async for d in stores.database.sessions.find()}
    assert left == {expired_lately, revoked_lately, live}
    assert {expired_long_ago, revoked_long_ago}.isdisjoint(left)


async def test_only_accounts_never_activated_are_purged(stores: Stores) -> None:
    users = stores.users
    old, young = NOW - 8 * DAY, NOW - 6 * DAY
    never_activated = await users.add(dated_user("idle", active=False, created_at=old))
    await users.add(dated_user("young", active=False, created_at=young))
    await users.add(dated_user("active", active=True, created_at=old))
    # Inactive without a pending activation: deactivated after activating, not a squatter.
    await users.add(dated_user("deactivated", active=False, created_at=old, pending=False))

    assert await stores.housekeeping.purge_never_activated_users(NOW - 7 * DAY) == 1
    assert await users.get(never_activated.id) is None
    left = {d["username"] async for d in stores.database.users.find()}
    assert left == {"young", "active", "deactivated"}
    # The username and email are free again.
    await users.add(dated_user("idle", active=False, created_at=NOW))


async def test_failed_mail_is_purged_after_the_retention(stores: Stores) -> None:
    outbox = stores.outbox
    for to in ("old@x.io", "new@x.io", "pending@x.io"):
        await outbox.enqueue(Mail(to=to, subject="s", body="b"), NOW - 10 * DAY)
    for to, failed_at in (("old@x.io", NOW - 8 * DAY), ("new@x.io", NOW - 6 * DAY)):
        document = await stores.database.outbox.find_one({"to": to})
        assert document is not None
        await outbox.give_up(str(document["_id"]), "refused", failed_at)

    assert await stores.housekeeping.purge_failed_mail(NOW - 7 * DAY) == 1
    left = {d["to"] async for d in stores.database.outbox.find()}
    assert left == {"new@x.io", "pending@x.io"}


async def test_mail_queued_before_bodies_were_sealed_is_sealed_at_start_and_still_sent(stores: Stores) -> None:
    legacy = {"subject": "s", "attempts": 1, "created_at": NOW - 10 * DAY}
    await stores.database.outbox.insert_many(
        [
            {**legacy, "to": "pending@x.io", "body": "code 123456", "status": "pending", "next_attempt_at": NOW},
            {**legacy, "to": "failed@x.io", "body": "code 654321", "status": "failed", "next_attempt_at": NOW},
        ]
    )
    assert await stores.outbox.seal_legacy_mail() == 2
    assert await stores.outbox.seal_legacy_mail() == 0
    raw = [document async for document in stores.database.outbox.find()]
    assert all("body" not in document for document in raw)
    assert all(b"123456" not in bytes(document["sealed_body"]) for document in raw)
    claimed = await stores.outbox.claim(NOW, 60)
    assert claimed is not None
    assert claimed.mail == Mail(to="pending@x.io", subject="s", body="code 123456")
    # The failed one is dated by its last attempt, so its retention runs from there.
    assert await stores.housekeeping.purge_failed_mail(NOW) == 0
    assert await stores.housekeeping.purge_failed_mail(NOW + timedelta(seconds=1)) == 1


async def test_the_indexes_of_the_used_digests_list_are_dropped(stores: Stores) -> None:
    sessions = stores.database.sessions
    await sessions.create_index([("token_digest", 1)], unique=True, name="token_digest_unique")
    await sessions.create_index([("used_digests", 1)], name="used_digests")
    await stores.sessions.ensure_indexes()
    await stores.sessions.ensure_indexes()
    names = {index["name"] async for index in await sessions.list_indexes()}
    assert names == {"_id_", "user_id", "expires_at", "revoked_at"}


async def test_rotation_keeps_a_session_the_same_size(stores: Stores) -> None:
    """Replay detection keeps no list of used tokens: a thousand refreshes leave the size as it was."""
    sessions = stores.sessions
    session_id = sessions.new_id()
    digest = "{:064x}".format
    await sessions.create(session_id, "u" * 24, digest(0), NOW, NOW + 30 * DAY, 0)

    async def size() -> int:
        document = await stores.database.sessions.find_one({"_id": ObjectId(session_id)})
        assert document is not None
        return len(bson.encode(document))

    await sessions.rotate(session_id, 0, digest(0), digest(1), NOW)
    first = await size()
    for generation in range(1, 1000):
        rotated = await sessions.rotate(session_id, generation, digest(generation), digest(generation + 1), NOW)
        assert rotated is not None
    assert await size() == first
    # An old generation, or the current one with another digest, does not rotate.
    assert await sessions.rotate(session_id, 999, digest(999), "x", NOW) is None
    assert await sessions.rotate(session_id, 1000, "wrong", "x", NOW) is None
    # Only a generation the session has moved past counts as a replay.
    assert not await sessions.revoke_replayed(session_id, 1000, NOW)
    assert await sessions.revoke_replayed(session_id, 999, NOW)
    assert await sessions.rotate(session_id, 1000, digest(1000), "x", NOW) is None


# Each purge query, by collection: an index must serve it.
PURGES = [
    *(("sessions", query) for query in ended_sessions_queries(NOW)),
    ("users", never_activated_query(NOW)),
    ("outbox", failed_mail_query(NOW)),
    ("throttles", expired_tallies_query(NOW)),
]


@pytest.mark.parametrize(("collection", "query"), PURGES)
async def test_every_purge_is_served_by_an_index(stores: Stores, collection: str, query: dict[str, Any]) -> None:
    """An index leads with the purge's fields; on MongoDB the plan is an index scan (FerretDB's
    SQLite backend scans whatever the indexes)."""
    indexes = [index["key"] async for index in await stores.database[collection].list_indexes()]
    assert any(next(iter(key)) in query and set(key) <= set(query) for key in indexes), indexes
    explained = await stores.database.command("explain", {"delete": collection, "deletes": [{"q": query, "limit": 0}]})
    if "ferretdbVersion" in explained.get("serverInfo", {}):
        return
    plan = str(explained["queryPlanner"]["winningPlan"])
    assert "IXSCAN" in plan, plan
    assert "COLLSCAN" not in plan, plan


async def test_expired_tallies_are_purged_and_live_ones_kept(stores: Stores) -> None:
    tallies = stores.throttle
    await tallies.hit("rate:10.0.0.1:0", NOW)
    await tallies.remember("known:u1:10.0.0.1", "u1", NOW, NOW + DAY)
    assert await stores.housekeeping.purge_expired_tallies(NOW) == 0
    assert await stores.housekeeping.purge_expired_tallies(NOW + timedelta(seconds=1)) == 1
    assert set(await tallies.get(["rate:10.0.0.1:0", "known:u1:10.0.0.1"])) == {"known:u1:10.0.0.1"}


async def test_housekeeping_releases_every_stale_claim_whose_user_does_not_hold_the_name(stores: Stores) -> None:
    claims = stores.claims
    for name in ("orphan1", "orphan2"):
        assert await claims.claim("username", name, ObjectId(), NOW) is Claim.NEW
    bound = timedelta(seconds=CLAIM_SETTLE_SECONDS)
    assert await stores.housekeeping.release_stale_claims(NOW + bound) == 0
    assert await stores.housekeeping.release_stale_claims(NOW + bound + SECOND) == 2
    assert await stores.database["claims"].count_documents({}) == 0


async def test_a_purged_never_activated_user_is_published_as_deleted_when_it_was_purged(stores: Stores) -> None:
    idle = await stores.users.add(new_user("idle", "idle@example.com"))
    started = datetime.now(UTC).replace(microsecond=0)
    assert await stores.housekeeping.purge_never_activated_users(NOW + DAY) == 1
    finished = datetime.now(UTC) + SECOND
    changes = stores.changes
    deleted = (await changes.read_after(0, 10))[-1]
    assert (deleted.user_id, deleted.type, deleted.user) == (idle.id, ChangeType.DELETED, None)
    assert started <= deleted.changed_at <= finished


async def test_the_purge_finishes_every_deletion_it_marks_though_they_take_more_than_one_sweep(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two users a sweep, so three take two sweeps (as 101 would at the real limit of 100).
    monkeypatch.setattr(housekeeping_store, "_SWEEP_LIMIT", 2)
    for n in range(3):
        await stores.users.add(new_user(f"idle{n}", f"idle{n}@example.com"))
    assert await stores.housekeeping.purge_never_activated_users(NOW + DAY) == 3
    assert await stores.database["users"].count_documents({}) == 0
    assert await stores.database["claims"].count_documents({}) == 0


async def test_a_lease_records_its_holder_until_when_and_since_when_it_was_taken(stores: Stores) -> None:
    leases = stores.housekeeping
    assert await leases.take_lease("purge", "replica1", NOW, 60)
    assert await leases.take_lease("sweep", "replica2", NOW + SECOND, 60)
    assert await stores.database["leases"].find_one({"_id": "purge"}) == {
        "_id": "purge",
        "holder": "replica1",
        "leased_until": NOW + 60 * SECOND,
        "taken_at": NOW,
    }
