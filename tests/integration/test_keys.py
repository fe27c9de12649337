"""What the smaller stores write and read back against the real database, each on one of several
documents: throttle tallies (kind, account, expiry), signing keys and key material, sessions'
revocation times, the schema's state, stale claims, and the purge of never-activated users."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from tests.support.records import NOW, new_user
from tests.support.stores import Stores
from users_grpc import repository
from users_grpc.domain import ChangeType, StoredKey, Tally
from users_grpc.repository import (
    CLAIM_SETTLE_SECONDS,
    Claim,
)

SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)


async def test_tallies_are_stored_under_their_key_with_their_kind_account_and_expiry(stores: Stores) -> None:
    tallies, raw = stores.throttle, stores.database["throttles"]
    await tallies.remember("known:u1:10.0.0.1", "u1", NOW, NOW + DAY)
    await tallies.remember("known:u1:10.0.0.1", "u1", NOW + SECOND, NOW + 2 * DAY)
    await tallies.remember("known:u2:10.0.0.1", "u2", NOW, NOW + DAY)
    assert [await tallies.hit("rate:10.0.0.1:0", NOW + SECOND) for _ in range(2)] == [1, 2]
    assert await tallies.hit("rate:10.0.0.2:0", NOW + SECOND) == 1
    assert await raw.find_one({"_id": "known:u1:10.0.0.1"}) == {
        "_id": "known:u1:10.0.0.1",
        "account": "u1",
        "kind": "known",
        "count": 2,
        "last_at": NOW + SECOND,
        "expires_at": NOW + 2 * DAY,
    }
    assert await raw.find_one({"_id": "rate:10.0.0.1:0"}) == {
        "_id": "rate:10.0.0.1:0",
        "count": 2,
        "kind": "rate",
        "expires_at": NOW + SECOND,
    }
    # Each tally goes when its own time is up.
    assert await stores.housekeeping.purge_expired_tallies(NOW + 2 * SECOND) == 2
    assert await stores.housekeeping.purge_expired_tallies(NOW + DAY + SECOND) == 1
    assert [document["_id"] async for document in raw.find()] == ["known:u1:10.0.0.1"]


async def test_a_failure_tally_expires_when_its_last_count_says_and_is_uncounted_down_to_zero_only(
    stores: Stores,
) -> None:
    tallies = stores.throttle
    window = timedelta(minutes=15)
    first = await tallies.count_failure("password:u1:a", "u1", seen=None, now=NOW, window=window, expires_at=NOW + DAY)
    assert first == Tally(count=1, last_at=NOW)
    assert await tallies.count_failure(
        "password:u1:a", "u1", seen=first, now=NOW + SECOND, window=window, expires_at=NOW + 2 * DAY
    ) == Tally(count=2, last_at=NOW + SECOND)
    await tallies.count_failure("password:u2:a", "u2", seen=None, now=NOW, window=window, expires_at=NOW + DAY)
    await tallies.uncount_failure("password:u2:a")
    await tallies.uncount_failure("password:u2:a")
    assert (await tallies.get(["password:u2:a"]))["password:u2:a"].count == 0
    assert await stores.housekeeping.purge_expired_tallies(NOW + DAY + SECOND) == 1
    assert list(await tallies.get(["password:u1:a", "password:u2:a"])) == ["password:u1:a"]
    assert await stores.housekeeping.purge_expired_tallies(NOW + 2 * DAY + SECOND) == 1


async def test_signing_keys_are_retired_once_and_resealed_only_from_what_was_read(stores: Stores) -> None:
    keys = stores.keys
    retired = StoredKey(kid="old", sealed_private_key=b"o", created_at=NOW - DAY, retired_at=NOW)
    first = StoredKey(kid="k1", sealed_private_key=b"a", created_at=NOW)
    second = StoredKey(kid="k2", sealed_private_key=b"a", created_at=NOW)
    for key in (retired, first, second):
        await keys.add(key)
    assert sorted(await keys.all(), key=lambda key: key.kid) == [first, second, retired]
    assert not await keys.reseal("k2", b"stale", b"b")
    assert await keys.reseal("k2", b"a", b"b")
    assert not await keys.retire("old", NOW + DAY)
    assert await keys.retire("k1", NOW + SECOND)
    assert not await keys.retire("k1", NOW + DAY)
    assert sorted(await keys.all(), key=lambda key: key.kid) == [
        StoredKey(kid="k1", sealed_private_key=b"a", created_at=NOW, retired_at=NOW + SECOND),
        StoredKey(kid="k2", sealed_private_key=b"b", created_at=NOW),
        retired,
    ]


async def test_key_material_is_read_by_its_name(stores: Stores) -> None:
    material = stores.key_material
    assert await material.add("first", b"1")
    assert await material.add("second", b"2")
    assert [await material.get("second"), await material.get("first"), await material.get("third")] == [
        b"2",
        b"1",
        None,
    ]


async def test_a_session_keeps_the_time_it_was_first_revoked(stores: Stores) -> None:
    sessions, raw = stores.sessions, stores.database["sessions"]

    async def revoked_at(session_id: str) -> Any:
        document = await raw.find_one({"_id": ObjectId(session_id)})
        assert document is not None
        return document["revoked_at"]

    ids = [sessions.new_id() for _ in range(4)]
    for session_id in ids:
        await sessions.create(session_id, "u1", "t", NOW, NOW + DAY, 0)
    revoked, replayed = ids[:2]
    await sessions.revoke(revoked, NOW + SECOND)
    await sessions.revoke(revoked, NOW + 2 * SECOND)
    assert await sessions.rotate(replayed, 0, "t", "t2", NOW) is not None
    assert await sessions.revoke_replayed(replayed, 0, NOW + SECOND) is not None
    assert await sessions.revoke_replayed(replayed, 0, NOW + 2 * SECOND) is None
    await sessions.revoke_all("u1", NOW + 3 * SECOND)
    assert [await revoked_at(session_id) for session_id in ids] == [
        NOW + SECOND,
        NOW + SECOND,
        NOW + 3 * SECOND,
        NOW + 3 * SECOND,
    ]


async def test_the_schema_state_is_the_users_layouts_and_service_account_names_have_their_unique_index(
    stores: Stores,
) -> None:
    await stores.database["schema"].insert_one({"_id": "another-layout", "version": 9})
    schema = stores.schema
    assert await schema.state() is None
    await schema.record(3)
    assert await schema.state() == {"_id": "users", "version": 3}
    accounts = stores.service_accounts
    await accounts.ensure_indexes()
    indexes = await stores.database["service_accounts"].index_information()
    assert (indexes["name_unique"]["key"], indexes["name_unique"]["unique"]) == ([("name", 1)], True)


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
    monkeypatch.setattr(repository, "_SWEEP_LIMIT", 2)
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
