"""Usernames and emails in the repository against the real database: claims (one holder per
name, taken over only from a user that no longer holds it), changes of address and renames
(the new name claimed, the old one freed), a database still on schema 1's unique indexes, and the
schema's state."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from tests.support.records import NOW, activation, new_user
from tests.support.stores import Stores
from users_grpc.adapters.mongo.claims import CLAIM_SETTLE_SECONDS, Claim, claim_documents
from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import ChangeType, Mail, PendingEmailChange, ProfileChanges, Version

BOUND = timedelta(seconds=CLAIM_SETTLE_SECONDS)
# Microseconds the database drops: what a method returns must equal what is read back later.
LATER = NOW + timedelta(minutes=5, microseconds=700_500)
STORED_LATER = NOW + timedelta(minutes=5, milliseconds=700)


async def claims_of(stores: Stores) -> dict[str, Any]:
    return {claim["_id"]: claim async for claim in stores.database["claims"].find()}


async def test_a_name_has_one_claimant_and_a_claim_is_taken_over_only_from_a_user_without_the_name(
    stores: Stores,
) -> None:
    claims = stores.claims
    first, second = ObjectId(), ObjectId()
    assert await claims.claim("username", "jane", first, NOW) is Claim.NEW
    assert await claims.claim("username", "jane", first, NOW) is Claim.HELD
    assert await claims.claim("username", "jane", second, NOW + BOUND - timedelta(seconds=1)) is None
    assert await claims.holder("username", "jane") == first
    assert await claims.holder("email", "jane") is None
    # Pending until its user's document is written; released only by its holder.
    assert (await claims_of(stores))["username:jane"]["pending_since"] == NOW
    await claims.settle("username", "jane", first)
    assert "pending_since" not in (await claims_of(stores))["username:jane"]
    await claims.release("username", "jane", second)
    assert await claims.holder("username", "jane") == first
    # Its user never held the name (a deletion that died halfway): after the bound, another takes it.
    assert await claims.claim("username", "jane", second, NOW + BOUND) is Claim.NEW
    assert await claims.holder("username", "jane") == second
    taken = (await claims_of(stores))["username:jane"]
    assert (taken["claimed_at"], taken["pending_since"]) == (NOW + BOUND, NOW + BOUND)
    await claims.release("username", "jane", second)
    assert await claims.holder("username", "jane") is None


async def test_a_claim_whose_user_holds_the_name_is_never_taken_over(stores: Stores) -> None:
    await stores.users.add(new_user("joe", "joe@example.com"))  # another user, who holds neither name
    user = await stores.users.add(new_user())
    claims = stores.claims
    much_later = NOW + 100 * BOUND
    assert await claims.claim("username", "jane", ObjectId(), much_later) is None
    assert await claims.claim("email", "jane@example.com", ObjectId(), much_later) is None
    assert await claims.holder("username", "jane") == ObjectId(user.id)
    # The same key of the other kind is another name.
    assert await claims.claim("email", "jane", ObjectId(), much_later) is Claim.NEW


async def test_stale_pending_claims_are_settled_if_their_user_holds_the_name_and_released_if_not(
    stores: Stores,
) -> None:
    claims = stores.claims
    user = await stores.users.add(new_user())
    holder = ObjectId(user.id)
    await stores.database["claims"].update_one({"_id": "username:jane"}, {"$set": {"pending_since": NOW}})
    assert await claims.claim("username", "orphan", ObjectId(), NOW) is Claim.NEW
    assert await claims.claim("username", "young", ObjectId(), NOW + BOUND) is Claim.NEW
    assert await claims.release_stale(NOW + BOUND) == 0  # none older than the bound yet
    assert await claims.release_stale(NOW + BOUND + timedelta(seconds=1)) == 1
    left = await claims_of(stores)
    assert set(left) == {"username:jane", "email:jane@example.com", "username:young"}
    assert "pending_since" not in left["username:jane"]
    assert left["username:jane"]["user_id"] == holder


async def test_a_deleted_user_gives_up_both_names_and_backfill_claims_the_names_of_users_without_claims(
    stores: Stores,
) -> None:
    jane = await stores.users.add(new_user())
    joe = await stores.users.add(new_user("joe", "joe@example.com"))
    assert await stores.users.delete(jane.id)
    assert set(await claims_of(stores)) == {"username:joe", "email:joe@example.com"}
    assert (await stores.users.add(new_user())).username == "jane"
    # Users written before claims existed: backfill claims their names, reports clashes.
    await stores.database["claims"].delete_many({})
    stray = ObjectId()
    await stores.database["claims"].insert_one({"_id": "username:joe", "user_id": stray, "claimed_at": NOW})
    claims = stores.claims
    last, conflicts = await claims.backfill(None, 10, NOW)
    assert last is not None
    assert conflicts == [f"username of user {joe.id} is claimed by user {stray}"]
    assert {claim: doc["user_id"] for claim, doc in (await claims_of(stores)).items()} == {
        "username:joe": stray,
        "email:joe@example.com": ObjectId(joe.id),
        "username:jane": last,
        "email:jane@example.com": last,
    }
    assert await claims.backfill(last, 10, NOW) == (None, [])


def test_claim_documents_are_the_settled_claims_of_both_names() -> None:
    user = {"_id": ObjectId(), "username_key": "jane", "email_key": "jane@example.com"}
    assert claim_documents(user, NOW) == [
        {"_id": "username:jane", "user_id": user["_id"], "claimed_at": NOW},
        {"_id": "email:jane@example.com", "user_id": user["_id"], "claimed_at": NOW},
    ]


async def test_a_new_address_is_claimed_the_old_one_freed_and_pending_tokens_end(stores: Stores) -> None:
    users = stores.users
    user = await users.add(new_user())
    assert await users.activate(user.id, "d1", NOW) is not None
    code = activation(digest="reset", expires_at=NOW + timedelta(hours=1))
    assert await users.replace_password_reset(user.id, code, max_sends=3, window_seconds=60)
    swapped = await users.set_email(user.id, "Jane.New@Example.com", LATER)
    assert swapped is not None
    old, new = swapped
    assert old.email == "jane@example.com"
    assert new == dataclasses.replace(old, email="Jane.New@Example.com", updated_at=STORED_LATER)
    assert await users.get(user.id) == new
    [change] = await stores.changes.read_after(2, 10)
    assert (change.type, change.changed_at, change.user) == (ChangeType.EMAIL_CHANGED, STORED_LATER, new)
    account = await users.find_account("jane.new@example.com")
    assert account is not None
    assert account.user.id == user.id
    assert account.password_reset is None
    assert await users.find_account("jane@example.com") is None
    assert set(await claims_of(stores)) == {"username:jane", "email:jane.new@example.com"}
    with pytest.raises(AlreadyExists) as error:
        await users.add(new_user("joe", "JANE.NEW@example.com"))
    assert error.value.field == "email"
    assert (await users.add(new_user("joe", "jane@example.com"))).email == "jane@example.com"


async def test_an_address_held_by_another_user_or_a_missing_user_changes_nothing(stores: Stores) -> None:
    users = stores.users
    jane = await users.add(new_user())
    await users.add(new_user("joe", "joe@example.com"))
    with pytest.raises(AlreadyExists) as error:
        await users.set_email(jane.id, "Joe@example.com", NOW)
    assert error.value.field == "email"
    assert await users.get(jane.id) == jane
    # Nobody to change: the address claimed for the call is given back.
    assert await users.set_email(str(ObjectId()), "free@example.com", NOW) is None
    assert "email:free@example.com" not in await claims_of(stores)
    # Letter case only: the user holds the claim already, and keeps it.
    swapped = await users.set_email(jane.id, "JANE@example.com", NOW)
    assert swapped is not None
    assert swapped[1].email == "JANE@example.com"
    assert (await claims_of(stores))["email:jane@example.com"]["user_id"] == ObjectId(jane.id)


async def test_the_notice_of_a_change_of_address_goes_only_to_the_address_replaced(stores: Stores) -> None:
    users = stores.users
    user = await users.add(new_user())
    stale = Mail(to="someone.else@example.com", subject="s", body="b")
    assert await users.set_email(user.id, "new@example.com", NOW, stale) is None
    assert "email:new@example.com" not in await claims_of(stores)
    notice = Mail(to="jane@example.com", subject="Your address changed", body="b")
    assert await users.set_email(user.id, "new@example.com", NOW, notice) is not None
    pending = await users.claim_pending_notices(NOW, 60)
    assert pending is not None
    assert [n.mail for n in pending.notices] == [notice]


async def test_a_pending_change_of_address_is_confirmed_once_by_its_code_before_it_expires(stores: Stores) -> None:
    users = stores.users
    user = await users.add(new_user())
    code = activation(digest="change", expires_at=NOW + timedelta(minutes=15), attempts_left=3)
    change = PendingEmailChange(new_email="new@example.com", code=code)
    # Only an active account changes its address.
    assert not await users.pend_email_change(user.id, change, max_sends=3, window_seconds=60)
    assert await users.activate(user.id, "d1", NOW) is not None
    assert await users.pend_email_change(user.id, change, max_sends=3, window_seconds=60)
    reserved = await users.reserve_email_change_attempt(user.id, NOW)
    left = dataclasses.replace(code, attempts_left=2)
    assert reserved == PendingEmailChange(new_email="new@example.com", code=left)
    assert await users.reserve_email_change_attempt(user.id, NOW + timedelta(minutes=15)) is None
    assert await users.confirm_email_change(user.id, "new@example.com", "wrong", NOW) is None
    assert await users.confirm_email_change(user.id, "other@example.com", "change", NOW) is None
    late = NOW + timedelta(minutes=15)
    assert await users.confirm_email_change(user.id, "new@example.com", "change", late) is None
    assert set(await claims_of(stores)) == {"username:jane", "email:jane@example.com"}
    confirmed = await users.confirm_email_change(user.id, "new@example.com", "change", NOW)
    assert confirmed is not None
    assert confirmed[1].email == "new@example.com"
    assert await users.confirm_email_change(user.id, "new@example.com", "change", NOW) is None
    assert await users.reserve_email_change_attempt(user.id, NOW) is None


async def test_a_rename_claims_the_new_name_frees_the_old_and_checks_the_version(stores: Stores) -> None:
    users = stores.users
    user = await users.add(new_user())
    await users.add(new_user("joe", "joe@example.com"))
    with pytest.raises(AlreadyExists) as error:
        await users.update_profile(user.id, ProfileChanges(username="JOE"), None, NOW)
    assert error.value.field == "username"
    stale = Version(revision=5, updated_at=NOW)
    assert await users.update_profile(user.id, ProfileChanges(username="janet"), stale, LATER) is None
    assert "username:janet" not in await claims_of(stores)
    current = Version(revision=user.revision, updated_at=user.updated_at)
    renamed = await users.update_profile(user.id, ProfileChanges(username="Janet"), current, LATER)
    assert renamed is not None
    assert (renamed.username, renamed.revision, renamed.updated_at) == ("Janet", 1, STORED_LATER)
    assert await users.find_account("janet") is not None
    assert await users.find_account("jane") is None
    names = await claims_of(stores)
    assert names["username:janet"]["user_id"] == ObjectId(user.id)
    assert "pending_since" not in names["username:janet"]
    assert "username:jane" not in names


@pytest.mark.parametrize(
    ("username", "email", "field"), [("OLD", "x@example.com", "username"), ("x", "old@x.io", "email")]
)
async def test_on_schema_1_a_name_held_without_a_claim_is_refused_by_its_unique_index(
    stores: Stores, username: str, email: str, field: str
) -> None:
    """A user an older replica wrote without claims: its unique indexes refuse a second holder,
    the field is named, and the claims made for the refused write are given back."""
    schema = stores.schema
    await schema.ensure_identifier_indexes(unique=True)
    legacy = await stores.users.add(new_user("old", "old@x.io"))
    await stores.database["claims"].delete_many({})
    with pytest.raises(AlreadyExists) as error:
        await stores.users.add(new_user(username, email))
    assert error.value.field == field
    assert await claims_of(stores) == {}
    # A rename onto the legacy name: refused by the index in the update, its claim given back.
    other = await stores.users.add(new_user("other", "other@x.io"))
    with pytest.raises(AlreadyExists) as error:
        await stores.users.update_profile(other.id, ProfileChanges(username="old"), None, NOW)
    assert error.value.field == "username"
    with pytest.raises(AlreadyExists) as error:
        await stores.users.set_email(other.id, "OLD@x.io", NOW)
    assert error.value.field == "email"
    assert set(await claims_of(stores)) == {"username:other", "email:other@x.io"}
    assert await stores.users.get(legacy.id) == legacy


async def test_the_schema_records_its_version_never_lower_and_drops_the_unique_indexes_once(stores: Stores) -> None:
    schema = stores.schema
    assert await schema.state() is None
    assert not await schema.has_users()
    await stores.users.add(new_user())
    assert await schema.has_users()
    await schema.record(2, progress={"after": "x"})
    assert await schema.state() == {"_id": "users", "version": 2, "progress": {"after": "x"}}
    await schema.record(1)
    assert await schema.state() == {"_id": "users", "version": 2}
    # Where earlier releases keep it, so that they and this one read one version.
    assert await stores.database["schema"].find_one({"_id": "users"}) == {"_id": "users", "version": 2}
    await schema.ensure_identifier_indexes(unique=True)
    names = set(await stores.database["users"].index_information())
    assert {"username_key_unique", "email_key_unique"} <= names
    await schema.drop_unique_identifier_indexes()
    await schema.drop_unique_identifier_indexes()  # dropped already: nothing to do
    await schema.ensure_identifier_indexes(unique=False)
    indexes = await stores.database["users"].index_information()
    assert {"username_key_unique", "email_key_unique"}.isdisjoint(indexes)
    assert indexes["username_key"]["key"] == [("username_key", 1)]
    assert not indexes["email_key"].get("unique", False)
    assert await schema.claims.holder("username", "jane") is not None


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
