"""The PyMongo repository and outbox against the real database (FerretDB, or USERS_TEST_MONGODB_URI)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TypeVar

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient

from tests.support.records import NOW, activation, new_user
from tests.support.sockets import collect_known_leaks
from tests.support.stores import Stores
from users_grpc.domain import Mail
from users_grpc.errors import AlreadyExists, StorageUnavailable
from users_grpc.repository import Document, MongoUserRepository

_T = TypeVar("_T")


# The indexes the stores make at start-up, each serving a query named where it is made (the
# identifier indexes are the schema's, tests/e2e/test_claims.py). A change here is a change of the
# data model, made deliberately. `sparse` is left out: FerretDB does not report it.
INDEXES: dict[str, dict[str, tuple[list[tuple[str, int]], bool]]] = {
    "audit_events": {
        "_id_": ([("_id", 1)], False),
        "actor_time_id": ([("actor.id", 1), ("time", -1), ("_id", -1)], False),
        "subject_time_id": ([("subject_id", 1), ("time", -1), ("_id", -1)], False),
        "time_id": ([("time", -1), ("_id", -1)], False),
        "type_time_id": ([("type", 1), ("time", -1), ("_id", -1)], False),
    },
    "claims": {"_id_": ([("_id", 1)], False), "pending_since": ([("pending_since", 1)], False)},
    "outbox": {
        "_id_": ([("_id", 1)], False),
        "status_failed_at": ([("status", 1), ("failed_at", 1)], False),
        "status_next_attempt_at": ([("status", 1), ("next_attempt_at", 1)], False),
    },
    "service_accounts": {"_id_": ([("_id", 1)], False), "name_unique": ([("name", 1)], True)},
    "sessions": {
        "_id_": ([("_id", 1)], False),
        "expires_at": ([("expires_at", 1)], False),
        "revoked_at": ([("revoked_at", 1)], False),
        "user_id": ([("user_id", 1)], False),
    },
    "throttles": {
        "_id_": ([("_id", 1)], False),
        "account": ([("account", 1)], False),
        "expires_at": ([("expires_at", 1)], False),
    },
    "user_changes": {
        "_id_": ([("_id", 1)], False),
        "published_at": ([("published_at", 1)], False),
        "user_id_number_unique": ([("user_id", 1), ("number", 1)], True),
    },
    "users": {
        "_id_": ([("_id", 1)], False),
        "created_at_id": ([("created_at", 1), ("_id", 1)], False),
        "deleting": ([("deleting", 1)], False),
        "is_active_created_at": ([("is_active", 1), ("created_at", 1)], False),
        "pending_changes_since": ([("pending_changes_since", 1)], False),
        "pending_mail_id": ([("pending_mail.id", 1)], False),
        "pending_mail_since": ([("pending_mail_since", 1)], False),
        "role_id": ([("role", 1), ("_id", 1)], False),
        "role_is_active": ([("role", 1), ("is_active", 1)], False),
        "state_id": ([("state", 1), ("_id", 1)], False),
    },
}


async def indexes(stores: Stores) -> dict[str, dict[str, tuple[list[tuple[str, int]], bool]]]:
    found: dict[str, dict[str, tuple[list[tuple[str, int]], bool]]] = {}
    for collection in await stores.database.list_collection_names():
        information = await stores.database[collection].index_information()
        found[collection] = {
            name: ([(field, int(order)) for field, order in spec["key"]], spec.get("unique", False))
            for name, spec in information.items()
        }
    return found


async def test_the_stores_make_exactly_their_indexes_and_a_second_start_up_keeps_them(stores: Stores) -> None:
    before = await indexes(stores)
    await stores.ensure_indexes()
    after = await indexes(stores)
    assert before == INDEXES
    assert after == INDEXES


async def test_round_trip_keeps_every_field(stores: Stores) -> None:
    added = await stores.users.add(new_user())
    assert await stores.users.get(added.id) == added
    account = await stores.users.find_account("JANE@EXAMPLE.COM".lower())
    assert account is not None
    assert account.user == added
    assert account.password_hash == "$2b$10$hash"
    assert account.activation == activation()


@pytest.mark.parametrize(
    ("username", "email", "field"), [("JANE", "x@y.io", "username"), ("joe", "Jane@Example.com", "email")]
)
async def test_duplicates_name_the_taken_field(stores: Stores, username: str, email: str, field: str) -> None:
    await stores.users.add(new_user())
    with pytest.raises(AlreadyExists) as error:
        await stores.users.add(new_user(username, email))
    assert error.value.field == field


async def test_activate_checks_code_and_expiry(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    assert await stores.users.activate(user.id, "wrong", NOW) is None
    assert await stores.users.activate(user.id, "d1", NOW + timedelta(minutes=16)) is None
    activated = await stores.users.activate(user.id, "d1", NOW)
    assert activated is not None
    assert activated.is_active
    assert activated.updated_at == NOW


async def test_attempts_are_reserved_until_none_are_left(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    assert await stores.users.reserve_activation_attempt(user.id, NOW + timedelta(minutes=16)) is None
    first = await stores.users.reserve_activation_attempt(user.id, NOW)
    assert first == activation(attempts_left=1)
    assert await stores.users.reserve_activation_attempt(user.id, NOW) == activation(attempts_left=0)
    assert await stores.users.reserve_activation_attempt(user.id, NOW) is None


async def test_parallel_reservations_never_exceed_the_attempts(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    results = await asyncio.gather(*(stores.users.reserve_activation_attempt(user.id, NOW) for _ in range(10)))
    assert sum(result is not None for result in results) == 2


async def test_activate_once_even_when_raced(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    results = await asyncio.gather(*(stores.users.activate(user.id, "d1", NOW) for _ in range(10)))
    assert sum(result is not None for result in results) == 1
    account = await stores.users.find_account("jane")
    assert account is not None
    assert account.user.is_active
    assert account.activation is None


async def test_replace_activation_code_counts_sends_per_window(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    later = NOW + timedelta(minutes=1)
    code = activation(digest="d2", window_started_at=later, attempts_left=5)
    assert await stores.users.replace_activation_code(user.id, code, max_sends=3, window_seconds=3600)
    assert await stores.users.replace_activation_code(user.id, code, max_sends=3, window_seconds=3600)
    assert not await stores.users.replace_activation_code(user.id, code, max_sends=3, window_seconds=3600)
    account = await stores.users.find_account("jane")
    assert account is not None
    assert account.activation == activation(digest="d2", attempts_left=5, sends_in_window=3)

    next_window = activation(digest="d3", window_started_at=NOW + timedelta(hours=1, seconds=1))
    assert await stores.users.replace_activation_code(user.id, next_window, max_sends=3, window_seconds=3600)
    account = await stores.users.find_account("jane")
    assert account is not None
    assert account.activation == next_window
    assert await stores.users.activate(user.id, "d3", NOW) is not None
    assert not await stores.users.replace_activation_code(user.id, next_window, max_sends=3, window_seconds=3600)


async def test_outbox_lease_hands_each_mail_to_one_sender_at_a_time(stores: Stores) -> None:
    await stores.outbox.enqueue(Mail(to="a@x.io", subject="s", body="b"), NOW)
    claims = await asyncio.gather(*(stores.outbox.claim(NOW, 60) for _ in range(5)))
    claimed = [claim for claim in claims if claim is not None]
    assert len(claimed) == 1
    assert claimed[0].mail == Mail(to="a@x.io", subject="s", body="b")
    assert claimed[0].attempts == 1
    # The sender died: after the lease another one takes the mail over.
    retaken = await stores.outbox.claim(NOW + timedelta(seconds=61), 60)
    assert retaken is not None
    assert (retaken.id, retaken.attempts) == (claimed[0].id, 2)
    await stores.outbox.delivered(retaken.id)
    assert await stores.outbox.claim(NOW + timedelta(days=1), 60) is None


async def test_outbox_retry_and_give_up(stores: Stores) -> None:
    await stores.outbox.enqueue(Mail(to="a@x.io", subject="s", body="b"), NOW)
    first = await stores.outbox.claim(NOW, 60)
    assert first is not None
    await stores.outbox.retry_later(first.id, NOW + timedelta(seconds=30), "refused")
    assert await stores.outbox.claim(NOW + timedelta(seconds=29), 60) is None
    second = await stores.outbox.claim(NOW + timedelta(seconds=30), 60)
    assert second is not None
    await stores.outbox.give_up(second.id, "refused", NOW + timedelta(seconds=30))
    assert await stores.outbox.claim(NOW + timedelta(days=365), 60) is None


NOTICE = Mail(to="jane@example.com", subject="Your password was changed", body="Hello jane")


async def test_a_change_and_its_notice_are_one_update(stores: Stores) -> None:
    """The notice waits in the user's document from the change's own update; a claim holds it for
    one sender; released, it leaves the document as it was."""
    user = await stores.users.add(new_user())
    assert await stores.users.claim_pending_notices(NOW, 60) is None
    assert await stores.users.set_password(user.id, "$2b$10$new", NOW, NOTICE)
    account = await stores.users.get_account(user.id)
    assert account is not None
    assert account.password_hash == "$2b$10$new"
    claims = await asyncio.gather(*(stores.users.claim_pending_notices(NOW, 60) for _ in range(5)))
    [claimed] = [claim for claim in claims if claim is not None]
    assert claimed.user_id == user.id
    assert [n.mail for n in claimed.notices] == [NOTICE]
    # A notice pended while the claim is held stays for the next claim.
    assert await stores.users.set_password(user.id, "$2b$10$newer", NOW, NOTICE)
    await stores.users.release_notices(claimed)
    again = await stores.users.claim_pending_notices(NOW, 60)
    assert again is not None
    assert len(again.notices) == 1
    assert again.notices[0].id != claimed.notices[0].id
    await stores.users.release_notices(again)
    assert await stores.users.claim_pending_notices(NOW + timedelta(days=1), 60) is None
    stored = await stores.database["users"].find_one({"_id": ObjectId(user.id)})
    assert stored is not None
    assert {"pending_mail", "pending_mail_since"}.isdisjoint(stored)


async def test_a_dead_senders_claim_runs_out_and_holds_its_notices_outbox_copies_till_then(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    await stores.users.set_password(user.id, "$2b$10$new", NOW, NOTICE)
    claimed = await stores.users.claim_pending_notices(NOW, 60)
    assert claimed is not None
    [notice] = claimed.notices
    await stores.outbox.enqueue(notice.mail, NOW, mail_id=notice.id, notice_of=user.id)
    await stores.outbox.enqueue(notice.mail, NOW, mail_id=notice.id, notice_of=user.id)  # a repeat does nothing
    # The sender dies here. Its copy may not go out while the claim holds the notice ...
    assert await stores.users.settle_notice(user.id, notice.id, NOW) == NOW + timedelta(seconds=60)
    assert await stores.users.claim_pending_notices(NOW + timedelta(seconds=59), 60) is None
    # ... and after the lease either the copy settles the notice, or another sender takes it over.
    assert await stores.users.settle_notice(user.id, notice.id, NOW + timedelta(seconds=61)) is None
    assert await stores.users.claim_pending_notices(NOW + timedelta(seconds=61), 60) is None
    copy = await stores.outbox.claim(NOW, 60)
    assert copy is not None
    assert (copy.id, copy.mail, copy.attempts, copy.notice_of) == (notice.id, NOTICE, 1, user.id)
    # A sender that found the notice still held hands the copy back, the attempt not counted.
    await stores.outbox.postpone(copy.id, NOW + timedelta(seconds=1))
    assert await stores.outbox.claim(NOW, 60) is None
    again = await stores.outbox.claim(NOW + timedelta(seconds=1), 60)
    assert again is not None
    assert (again.id, again.attempts) == (notice.id, 1)
    # A notice that no longer waits in the user's document settles at once.
    assert await stores.users.settle_notice(user.id, str(ObjectId()), NOW) is None


def test_unreachable_database_is_storage_unavailable() -> None:
    async def main() -> None:
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            "mongodb://127.0.0.1:9/", serverSelectionTimeoutMS=200, connectTimeoutMS=200
        )
        try:
            with pytest.raises(StorageUnavailable):
                await MongoUserRepository(client["x"]).get("0" * 24)
        finally:
            await client.close()

    # On a loop of its own, ended before the leak below is collected: PyMongo's async monitor
    # leaks its socket when close() cancels it mid-connect (pool_shared._async_create_connection
    # closes only on OSError), and the loop's end is what lets it go.
    asyncio.run(main())
    collect_known_leaks()


@pytest.mark.parametrize("bad_id", ["", "not-an-object-id", "g" * 24, "a" * 25, "\u0661" * 24])
async def test_an_id_that_is_no_object_id_names_no_document(stores: Stores, bad_id: str) -> None:
    """Ids normally arrive validated; one that slips through is "not found", never a bson error."""
    await stores.users.add(new_user())
    users = stores.users
    assert await users.get(bad_id) is None
    assert await users.get_account(bad_id) is None
    assert not await users.delete(bad_id)
    assert not await users.reserve_mfa_attempt(bad_id, NOW, max_attempts=5, window_seconds=60)
    assert await users.reserve_activation_attempt(bad_id, NOW) is None
    await users.bump_token_version(bad_id, NOW)
    await stores.outbox.delivered(bad_id)
