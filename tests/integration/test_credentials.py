"""The repository's session, key, MFA, reset and attempt methods against the real database: what
the unit tests' fakes stand in for (tests/support/fakes.py), held by the adapter itself."""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

from bson import ObjectId

from tests.support.records import NOW, activation, new_user
from tests.support.stores import Stores
from users_grpc.domain import Mail, StoredKey

_T = TypeVar("_T")
NOTICE = Mail(to="jane@example.com", subject="s", body="b")


async def active_user(stores: Stores) -> str:
    user = await stores.users.add(new_user())
    assert await stores.users.activate(user.id, "d1", NOW) is not None
    return user.id


async def test_sessions_rotate_once_revoke_replays_and_list_newest_first(stores: Stores) -> None:
    repo, user_id = stores.sessions, "u1"
    ids = [repo.new_id() for _ in range(3)]
    for n, session_id in enumerate(ids):
        await repo.create(session_id, user_id, f"t{n}", NOW + timedelta(minutes=n), NOW + timedelta(days=1), 0)
    listed = await repo.list_active(user_id, NOW + timedelta(minutes=5))
    assert [s.id for s in listed] == ids[::-1]
    # One rotation per generation and digest: the second with the same token finds nothing.
    rotated = await repo.rotate(ids[0], 0, "t0", "t0b", NOW)
    assert rotated is not None
    assert await repo.rotate(ids[0], 0, "t0", "t0c", NOW) is None
    # The old generation presented again revokes the session; a current one would not.
    assert await repo.revoke_replayed(ids[1], 0, NOW) is None  # ids[1] is still at generation 0
    revoked = await repo.revoke_replayed(ids[0], 0, NOW)
    assert revoked is not None
    assert revoked.id == ids[0]
    assert [s.id for s in await repo.list_active(user_id, NOW)] == ids[:0:-1]
    # Expired sessions are not listed; revoke_all ends the rest.
    assert await repo.list_active(user_id, NOW + timedelta(days=2)) == []
    await repo.revoke(ids[1], NOW)
    assert [s.id for s in await repo.list_active(user_id, NOW)] == [ids[2]]
    await repo.revoke_all(user_id, NOW)
    assert await repo.list_active(user_id, NOW) == []


async def test_the_key_store_keeps_sealed_keys_and_retires_each_once(stores: Stores) -> None:
    await stores.keys.add(StoredKey(kid="k1", sealed_private_key=b"\x00sealed", created_at=NOW))
    await stores.keys.add(StoredKey(kid="k2", sealed_private_key=b"other", created_at=NOW + timedelta(hours=1)))
    keys = {k.kid: k for k in await stores.keys.all()}
    assert keys["k1"] == StoredKey(kid="k1", sealed_private_key=b"\x00sealed", created_at=NOW)
    assert await stores.keys.retire("k1", NOW) is True
    assert await stores.keys.retire("k1", NOW) is False
    assert await stores.keys.retire("nope", NOW) is False
    keys = {k.kid: k for k in await stores.keys.all()}
    assert keys["k1"].retired_at == NOW
    assert keys["k2"].retired_at is None
    # Where earlier releases keep them, so that an upgraded replica signs with the same keys.
    assert await stores.database["signing_keys"].count_documents({}) == 2


async def test_mfa_enrollment_confirmation_steps_and_recovery_codes(stores: Stores) -> None:
    users = stores.users
    user_id = await active_user(stores)
    assert await users.start_mfa_enrollment(user_id, b"s1", NOW)
    assert await users.start_mfa_enrollment(user_id, b"s2", NOW)  # a pending one is replaced
    account = await users.get_account(user_id)
    assert account is not None
    assert account.mfa is not None
    assert (account.mfa.sealed_secret, account.mfa.active) == (b"s2", False)
    version = account.user.token_version
    assert await users.confirm_mfa(user_id, 100, ["r1", "r2"], NOW, NOTICE)
    assert not await users.start_mfa_enrollment(user_id, b"s3", NOW)  # on: no new enrollment
    account = await users.get_account(user_id)
    assert account is not None
    assert account.mfa is not None
    assert account.mfa.active
    assert account.user.token_version == version + 1
    # A step works once, and only a newer one after it.
    assert not await users.use_totp_step(user_id, 100)
    assert await users.use_totp_step(user_id, 101)
    assert not await users.use_totp_step(user_id, 101)
    assert await users.use_recovery_code(user_id, "r1")
    assert not await users.use_recovery_code(user_id, "r1")
    assert await users.replace_recovery_codes(user_id, ["r3"])
    assert not await users.use_recovery_code(user_id, "r2")
    assert await users.use_recovery_code(user_id, "r3")
    assert await users.disable_mfa(user_id, NOW, NOTICE)
    assert not await users.disable_mfa(user_id, NOW, NOTICE)
    assert not await users.use_totp_step(user_id, 200)


async def test_mfa_attempts_are_capped_per_window_and_need_an_enrollment(stores: Stores) -> None:
    users = stores.users
    user_id = await active_user(stores)
    assert not await users.reserve_mfa_attempt(user_id, NOW, max_attempts=2, window_seconds=60)
    assert await users.start_mfa_enrollment(user_id, b"s", NOW)
    results = [await users.reserve_mfa_attempt(user_id, NOW, max_attempts=2, window_seconds=60) for _ in range(3)]
    assert results == [True, True, False]
    later = NOW + timedelta(seconds=61)
    assert await users.reserve_mfa_attempt(user_id, later, max_attempts=2, window_seconds=60)


async def test_a_reset_token_is_found_by_its_digest_until_it_expires_and_works_once(stores: Stores) -> None:
    users = stores.users
    user_id = await active_user(stores)
    code = activation(digest="reset-digest", expires_at=NOW + timedelta(minutes=30))
    assert await users.replace_password_reset(user_id, code, max_sends=3, window_seconds=3600)
    found = await users.find_account_by_reset_digest(user_id, "reset-digest", NOW)
    assert found is not None
    assert found.user.id == user_id
    assert await users.find_account_by_reset_digest(user_id, "reset-digest", NOW + timedelta(minutes=31)) is None
    assert await users.find_account_by_reset_digest(user_id, "other", NOW) is None
    # The token names its user: the right digest under another user's id finds nobody.
    assert await users.find_account_by_reset_digest(str(ObjectId()), "reset-digest", NOW) is None
    version = found.user.token_version
    assert not await users.reset_password(user_id, "other", "$2b$10$new", NOW, NOTICE)
    assert await users.reset_password(user_id, "reset-digest", "$2b$10$new", NOW, NOTICE)
    assert not await users.reset_password(user_id, "reset-digest", "$2b$10$again", NOW, NOTICE)
    account = await users.get_account(user_id)
    assert account is not None
    assert account.password_hash == "$2b$10$new"
    assert account.user.token_version == version + 1
    assert await users.find_account_by_reset_digest(user_id, "reset-digest", NOW) is None


async def test_activation_attempts_run_out(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    left = [await stores.users.reserve_activation_attempt(user.id, NOW) for _ in range(3)]
    assert [a is not None for a in left] == [True, True, False]  # activation() allows two
    assert await stores.users.reserve_activation_attempt(str(ObjectId()), NOW) is None
