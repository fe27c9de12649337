"""A user's document in the repository against the real database (FerretDB, or
USERS_TEST_MONGODB_URI): every field read back as stored, a duplicate name named, activation by
code (expiry, attempts, races, sends per window), a change and its notice written in one update,
a dead sender's claim on notices, and ids that are no ObjectId."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TypeVar

import pytest
from bson import ObjectId

from tests.support.records import NOW, activation, new_user
from tests.support.stores import Stores
from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import Mail

_T = TypeVar("_T")


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
