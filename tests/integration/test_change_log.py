"""The change feed's store against the real database: every change of a user is published once,
in the user's order, at the next number of one dense sequence, with the user as stored (no
secret, none for a deletion); a deletion moves the user's waiting notices to the outbox and
frees its names."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from bson import ObjectId

from tests.support.records import NOW, new_user
from tests.support.stores import Stores
from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.domain.errors import StorageUnavailable
from users_grpc.domain.model import ChangeType, Mail, User, UserState

NOTICE = Mail(to="jane@example.com", subject="Your password was changed", body="Hello jane")


async def test_changes_are_read_in_one_dense_order_with_the_user_as_stored(stores: Stores) -> None:
    users, changes = stores.users, stores.changes
    assert await changes.last_sequence() == 0
    assert await changes.read_after(0, 10) == []
    jane = await users.add(new_user())
    joe = await users.add(new_user("joe", "joe@example.com"))
    activated = await users.activate(jane.id, "d1", NOW)
    assert activated is not None
    assert await changes.last_sequence() == 3
    feed = await changes.read_after(0, 10)
    assert [(c.sequence, c.user_id, c.number, c.type) for c in feed] == [
        (1, jane.id, 1, ChangeType.CREATED),
        (2, joe.id, 1, ChangeType.CREATED),
        (3, jane.id, 2, ChangeType.ACTIVATED),
    ]
    assert [c.changed_at for c in feed] == [NOW, NOW, NOW]
    # The user as stored when published: the latest state (no secrets are read).
    assert feed[2].user == activated
    assert feed[1].user == joe
    assert isinstance(feed[0].user, User)
    assert feed[0].user.id == jane.id
    assert await changes.read_after(1, 1) == feed[1:2]
    assert await changes.read_after(3, 10) == []
    # Publishing again publishes nothing twice.
    await changes.publish(jane.id)
    assert await changes.last_sequence() == 3


async def test_a_reader_past_a_purged_change_gets_the_lowest_one_left(stores: Stores) -> None:
    changes = stores.changes
    for n in range(3):
        await stores.users.add(new_user(f"user{n}", f"user{n}@example.com"))
    await stores.database["user_changes"].delete_many({"_id": {"$lte": 2}})
    [lowest] = await changes.read_after(0, 10)
    assert lowest.sequence == 3
    assert await changes.read_after(3, 10) == []


async def test_the_sequence_goes_on_from_the_head_or_from_the_newest_change(stores: Stores) -> None:
    """The head may lag (a publisher died before moving it) or be missing (changes stored before
    heads existed): the next change still takes the next free number, and none is lost."""
    changes = stores.changes
    for n in range(4):
        await stores.users.add(new_user(f"user{n}", f"user{n}@example.com"))
    heads = stores.database["user_changes_head"]
    assert await heads.find_one({"_id": "user_changes"}) == {"_id": "user_changes", "last": 4}
    await heads.update_one({"_id": "user_changes"}, {"$set": {"last": 1}})
    assert await changes.last_sequence() == 4
    user = await stores.users.add(new_user("user4", "user4@example.com"))
    assert [(c.sequence, c.user_id) for c in await changes.read_after(4, 10)] == [(5, user.id)]
    assert await heads.find_one({"_id": "user_changes"}) == {"_id": "user_changes", "last": 5}
    await heads.delete_many({})
    assert await changes.last_sequence() == 5
    await stores.users.add(new_user("user5", "user5@example.com"))
    assert await changes.last_sequence() == 6
    assert [c.sequence for c in await changes.read_after(0, 10)] == [1, 2, 3, 4, 5, 6]


async def test_changes_left_by_a_dead_publisher_are_published_by_the_sweep_in_order(stores: Stores) -> None:
    changes = stores.changes
    user = await stores.users.add(new_user())
    await stores.database["user_changes"].delete_many({})
    await stores.database["user_changes_head"].delete_many({})
    # Its changes as a publisher that died before publishing would have left them.
    await stores.database["users"].update_one(
        {"_id": ObjectId(user.id)},
        {
            "$set": {
                "change_number": 2,
                "pending_changes_since": NOW,
                "pending_changes": [
                    {"id": ObjectId(), "type": "created", "at": NOW},
                    {"id": ObjectId(), "type": "updated", "at": NOW + timedelta(seconds=1)},
                ],
            }
        },
    )
    assert await changes.sweep(NOW - timedelta(seconds=1)) == 0
    assert await changes.sweep(NOW) == 1
    feed = await changes.read_after(0, 10)
    assert [(c.number, c.type, c.changed_at) for c in feed] == [
        (1, ChangeType.CREATED, NOW),
        (2, ChangeType.UPDATED, NOW + timedelta(seconds=1)),
    ]
    stored = await stores.database["users"].find_one({"_id": ObjectId(user.id)})
    assert stored is not None
    assert {"pending_changes", "pending_changes_since"}.isdisjoint(stored)
    assert await changes.sweep(NOW + timedelta(days=1)) == 0


async def test_a_deletion_is_published_without_the_user_moves_its_notices_and_frees_its_names(stores: Stores) -> None:
    """Only the deleted user's: another user's notices wait on, its names stay claimed; and a
    notice a dead sender had copied to the outbox already goes out once."""
    changes = MongoChangeLog(stores.database, stores.outbox)
    users = MongoUserRepository(stores.database, changes)
    joe = await users.add(new_user("joe", "joe@example.com"))
    assert await users.set_password(joe.id, "$2b$10$new", NOW + timedelta(hours=1), NOTICE)
    user = await users.add(new_user())
    assert await users.set_password(user.id, "$2b$10$new", NOW, NOTICE)
    assert await users.set_password(user.id, "$2b$10$newer", NOW, NOTICE)
    claimed = await users.claim_pending_notices(NOW, 60)
    assert claimed is not None
    assert claimed.user_id == user.id
    copied = claimed.notices[0]
    await stores.outbox.enqueue(copied.mail, NOW, mail_id=copied.id, notice_of=user.id)
    # That sender dies here, its claim held.
    before = datetime.now(UTC)
    assert await users.delete(user.id)
    assert not await users.delete(user.id)
    assert await users.get(user.id) is None
    assert await stores.database["users"].find_one({"_id": ObjectId(user.id)}) is None
    deleted = (await changes.read_after(0, 10))[-1]
    assert (deleted.user_id, deleted.number, deleted.type, deleted.user) == (user.id, 2, ChangeType.DELETED, None)
    assert before - timedelta(seconds=1) <= deleted.changed_at <= datetime.now(UTC)
    # Both notices leave for the outbox, each once, as the deleted user's notices.
    mailed = [await stores.outbox.claim(datetime.now(UTC), 60) for _ in range(3)]
    assert sorted((m.id, m.mail, m.notice_of) for m in mailed if m is not None) == sorted(
        (n.id, NOTICE, user.id) for n in claimed.notices
    )
    assert mailed[2] is None
    assert {claim["_id"] async for claim in stores.database["claims"].find()} == {
        "username:joe",
        "email:joe@example.com",
    }
    joes = await users.claim_pending_notices(NOW + timedelta(hours=1), 60)
    assert joes is not None
    assert (joes.user_id, [n.mail for n in joes.notices]) == (joe.id, [NOTICE])
    assert (await users.add(new_user())).username == "jane"


async def test_a_user_marked_deleting_is_gone_for_every_call_and_finished_by_the_sweep(stores: Stores) -> None:
    changes = MongoChangeLog(stores.database, stores.outbox)
    users = MongoUserRepository(stores.database, changes)
    user = await users.add(new_user())
    assert await users.set_password(user.id, "$2b$10$new", NOW, NOTICE)
    # A deletion that died after its mark.
    marked = datetime.now(UTC)
    # Its publisher died too, between taking the published changes out and dropping the empty list.
    await stores.database["users"].update_one(
        {"_id": ObjectId(user.id)}, {"$set": {"deleting": marked, "pending_changes": []}}
    )
    assert await users.get(user.id) is None
    assert await users.find_account("jane") is None
    assert not await users.set_password(user.id, "$2b$10$newer", NOW, NOTICE)
    assert not await users.delete(user.id)
    assert await users.change_state(
        user.id, from_states=frozenset(UserState), to=UserState.LOCKED, now=NOW
    ) is None  # fmt: skip
    assert await changes.sweep(marked - timedelta(seconds=1)) == 0
    assert await changes.sweep(marked) == 1
    assert await stores.database["users"].find_one({"_id": ObjectId(user.id)}) is None
    moved = await stores.outbox.claim(datetime.now(UTC), 60)
    assert moved is not None
    assert (moved.mail, moved.notice_of) == (NOTICE, user.id)
    assert await stores.database["claims"].count_documents({}) == 0


async def test_the_published_user_carries_its_mfa_state_and_state_changes_name_what_they_did(stores: Stores) -> None:
    users, changes = stores.users, stores.changes
    user = await users.add(new_user())
    assert await users.activate(user.id, "d1", NOW) is not None
    assert await users.start_mfa_enrollment(user.id, b"s", NOW)
    assert await users.confirm_mfa(user.id, 1, [], NOW, NOTICE)
    for to in (UserState.LOCKED, UserState.ACTIVE, UserState.DEACTIVATED, UserState.ACTIVE):
        assert await users.change_state(user.id, from_states=frozenset(UserState) - {to}, to=to, now=NOW)
    feed = await changes.read_after(2, 10)
    assert [c.type for c in feed] == [
        ChangeType.UPDATED,
        ChangeType.LOCKED,
        ChangeType.UNLOCKED,
        ChangeType.DEACTIVATED,
        ChangeType.REACTIVATED,
    ]
    assert all(c.user is not None and c.user.mfa_enabled for c in feed)
    stored = await stores.database["user_changes"].find_one({"_id": 3})
    assert stored is not None
    assert stored["user"]["mfa"] == {"state": "active"}
    assert {"password_hash", "activation", "token_version"}.isdisjoint(stored["user"])


class DiesBeforePublishing(MongoChangeLog):
    """The change log of a process that dies after each update and before publishing its change."""

    async def publish(self, user_id: str) -> None:
        return None


async def test_a_change_its_process_did_not_publish_waits_for_the_sweep_from_its_time(stores: Stores) -> None:
    changes = stores.changes
    user = await stores.users.add(new_user())
    later = NOW + timedelta(minutes=10)
    dying = MongoUserRepository(stores.database, DiesBeforePublishing(stores.database))
    assert await dying.activate(user.id, "d1", later) is not None
    assert await dying.set_password(user.id, "$2b$10$new", later + timedelta(hours=1), NOTICE)
    assert await changes.last_sequence() == 1
    assert await changes.sweep(later - timedelta(seconds=1)) == 0
    assert await changes.sweep(later) == 1
    assert [(c.number, c.type, c.changed_at) for c in await changes.read_after(0, 10)] == [
        (1, ChangeType.CREATED, NOW),
        (2, ChangeType.ACTIVATED, later),
    ]


class PublisherUnreachable(MongoChangeLog):
    """A change log whose database goes away between a change and its publishing."""

    async def publish(self, user_id: str) -> None:
        raise StorageUnavailable()


async def test_a_change_whose_publishing_fails_stands_and_is_left_for_the_sweep_with_a_warning(
    stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    users = MongoUserRepository(stores.database, PublisherUnreachable(stores.database))
    with caplog.at_level(logging.WARNING, logger="users_grpc.adapters.mongo.users_base"):
        user = await users.add(new_user())
    assert await users.get(user.id) == user
    [record] = [r for r in caplog.records if r.name == "users_grpc.adapters.mongo.users_base"]
    assert record.getMessage() == "changes left for the sweep"
    assert getattr(record, "user_id", None) == user.id
    assert record.exc_info is not None
    assert record.exc_info[0] is StorageUnavailable
    changes = stores.changes
    assert await changes.sweep(NOW) == 1
    [created] = await changes.read_after(0, 10)
    assert (created.user_id, created.type) == (user.id, ChangeType.CREATED)


async def test_the_retention_purge_deletes_changes_published_before_it_but_never_the_newest(stores: Stores) -> None:
    changes = stores.changes
    started = datetime.now(UTC)
    for n in range(3):
        await stores.users.add(new_user(f"user{n}", f"user{n}@example.com"))
    assert await stores.housekeeping.purge_changes(started - timedelta(seconds=1)) == 0
    assert await stores.housekeeping.purge_changes(datetime.now(UTC) + timedelta(hours=1)) == 2
    assert [c.sequence for c in await changes.read_after(0, 10)] == [3]
    assert await changes.last_sequence() == 3


async def test_an_entry_published_already_is_not_published_again(stores: Stores) -> None:
    """Its publisher died after publishing, before taking it out of the user's document."""
    changes = stores.changes
    await stores.users.add(new_user("ann", "ann@example.com"))
    user = await stores.users.add(new_user())
    await stores.database["users"].update_one(
        {"_id": ObjectId(user.id)},
        {
            "$set": {
                "pending_changes": [{"id": ObjectId(), "type": "created", "at": NOW}],
                "pending_changes_since": NOW,
            }
        },
    )
    assert await changes.sweep(NOW) == 1
    assert [(c.sequence, c.user_id, c.number) for c in await changes.read_after(1, 10)] == [(2, user.id, 1)]
    assert await changes.last_sequence() == 2
