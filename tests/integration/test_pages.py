"""Every paged read of the repository against the real database: the change feed, users, TOTP
secrets, service accounts, the audit trail and the claims backfill. The documents are stored in
another order than they are to be read (the database returns an unsorted read in insertion
order), so a page that is not sorted, or not cut at its cursor, shows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from bson import ObjectId

from tests.support.records import NOW, new_user
from tests.support.stores import Stores
from users_grpc.domain.model import (
    ActorKind,
    AuditActor,
    AuditEvent,
    AuditEventType,
    AuditFilter,
    AuditPosition,
    ServiceAccount,
    User,
    UserFilter,
)

MINUTE = timedelta(minutes=1)


async def users_stored_newest_first(stores: Stores, count: int) -> list[User]:
    """``count`` users, returned in ``_id`` order but stored the other way round."""
    made = [new_user(f"user{n}", f"user{n}@example.com") for n in range(count)]
    assert [fields.id for fields in made] == sorted(fields.id for fields in made)
    added = {fields.id: await stores.users.add(fields) for fields in reversed(made)}
    return [added[fields.id] for fields in made]


async def store_again(stores: Stores, collection: str, document_id: Any) -> None:
    """Delete the document and insert it again: it is read last by an unsorted read."""
    document = await stores.database[collection].find_one({"_id": document_id})
    assert document is not None
    await stores.database[collection].delete_one({"_id": document_id})
    await stores.database[collection].insert_one(document)


async def test_the_feed_reads_in_sequence_order_up_to_its_limit_and_past_a_gap_only_the_lowest_change_after_it(
    stores: Stores,
) -> None:
    changes = stores.changes
    users = await users_stored_newest_first(stores, 5)
    await store_again(stores, "user_changes", 4)
    feed = await changes.read_after(0, 10)
    assert [change.sequence for change in feed] == [1, 2, 3, 4, 5]
    assert [change.user_id for change in feed] == [user.id for user in reversed(users)]
    assert await changes.read_after(0, 2) == feed[:2]
    assert await changes.read_after(2, 2) == feed[2:4]
    assert await changes.read_after(3, 10) == feed[3:]
    # Change 3 not visible (yet, or ever): a reader past 2 gets the lowest one after it, alone.
    await stores.database["user_changes"].delete_one({"_id": 3})
    assert await changes.read_after(2, 10) == [feed[3]]
    # Nothing after the cursor is visible, though the head says there is: nothing to read yet.
    await stores.database["user_changes"].delete_many({"_id": {"$gt": 2}})
    assert await changes.read_after(2, 10) == []
    assert await changes.read_after(5, 10) == []


async def test_users_are_listed_by_id_from_after_the_cursor_up_to_the_limit(stores: Stores) -> None:
    users = await users_stored_newest_first(stores, 4)
    assert await stores.users.list_users(UserFilter(), None, 10) == users
    assert await stores.users.list_users(UserFilter(), None, 3) == users[:3]
    assert await stores.users.list_users(UserFilter(), users[1].id, 10) == users[2:]


async def test_sealed_totp_secrets_are_paged_by_user_id_with_none_for_users_without_mfa(stores: Stores) -> None:
    users = stores.users
    first, second, third = await users_stored_newest_first(stores, 3)
    assert await users.start_mfa_enrollment(first.id, b"sealed first", NOW)
    assert await users.start_mfa_enrollment(third.id, b"sealed third", NOW)
    page = await users.sealed_totp_secrets(None, 2)
    assert page == [(first.id, b"sealed first"), (second.id, b"")]
    assert await users.sealed_totp_secrets(second.id, 2) == [(third.id, b"sealed third")]
    assert await users.sealed_totp_secrets(first.id, 1) == [(second.id, b"")]
    assert await users.sealed_totp_secrets(third.id, 2) == []


async def test_service_accounts_are_listed_by_client_id_from_after_the_cursor(stores: Stores) -> None:
    accounts = stores.service_accounts
    await accounts.ensure_indexes()
    made = [ServiceAccount(client_id=accounts.new_id(), name=f"service{n}", created_at=NOW) for n in range(3)]
    for account in reversed(made):
        await accounts.add(account, f"digest of {account.name}")
    assert await accounts.list_after(None, 10) == made
    assert await accounts.list_after(None, 2) == made[:2]
    assert await accounts.list_after(made[0].client_id, 10) == made[1:]
    assert await accounts.list_after(made[2].client_id, 10) == []


async def test_audit_pages_run_newest_first_by_time_whatever_the_order_events_were_stored_in(stores: Stores) -> None:
    trail = stores.audit
    actor = AuditActor(kind=ActorKind.USER, id="b" * 24, source="127.0.0.1")
    for minutes in (1, 0, 3, 2):
        await trail.add(
            AuditEvent(
                type=AuditEventType.USER_LOCK,
                time=NOW + minutes * MINUTE,
                actor=actor,
                subject_id="a" * 24,
                status_code=minutes,
            )
        )
    first = await trail.list_events(AuditFilter(), None, 2)
    assert [event.status_code for event in first] == [3, 2]
    second = await trail.list_events(AuditFilter(), AuditPosition(first[-1].time, first[-1].id), 2)
    assert [event.status_code for event in second] == [1, 0]
    assert await trail.list_events(AuditFilter(), AuditPosition(second[-1].time, second[-1].id), 2) == []


async def test_the_backfill_claims_the_names_of_one_page_of_users_at_a_time_in_id_order(stores: Stores) -> None:
    first, second, third = await users_stored_newest_first(stores, 3)
    # Written before claims existed; the third before usernames were keyed.
    await stores.database["claims"].delete_many({})
    await stores.database["users"].update_one({"_id": ObjectId(third.id)}, {"$unset": {"username_key": ""}})
    claims = stores.claims
    assert await claims.backfill(None, 2, NOW) == (ObjectId(second.id), [])
    stored = {document["_id"]: document async for document in stores.database["claims"].find()}
    assert stored == {
        f"{kind}:{user.username if kind == 'username' else user.email}": {
            "_id": f"{kind}:{user.username if kind == 'username' else user.email}",
            "user_id": ObjectId(user.id),
            "claimed_at": NOW,
        }
        for user in (first, second)
        for kind in ("username", "email")
    }
    assert await claims.backfill(ObjectId(second.id), 2, NOW + MINUTE) == (ObjectId(third.id), [])
    assert await claims.holder("email", third.email) == ObjectId(third.id)
    assert await claims.holder("username", third.username) is None
    assert await stores.database["claims"].count_documents({}) == 5
    assert await claims.backfill(ObjectId(third.id), 2, NOW) == (None, [])
