"""What the repository keeps of credentials, against the real database: what the unit tests'
fakes stand in for (tests/support/fakes.py), held by the adapter itself. Sessions (rotated once,
replays revoked, read back as made, the first revocation time kept), MFA enrollment and attempts,
reset tokens, activation attempts, an account's secrets, scheme and MFA, an admin's MFA reset, and
service accounts (unique names, the secret never read back)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from bson import ObjectId

from tests.support.records import NOW, activation, new_user
from tests.support.stores import Stores
from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import Mail, Mfa, PasswordScheme, ServiceAccount, Session

SECOND = timedelta(seconds=1)


DAY = timedelta(days=1)


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


async def test_an_account_reads_back_its_secrets_its_scheme_and_its_mfa(stores: Stores) -> None:
    users = stores.users
    imported = dataclasses.replace(new_user(), password_scheme=PasswordScheme.BCRYPT, imported=True)
    user = await users.add(imported)
    account = await users.get_account(user.id)
    assert account is not None
    assert (account.password_scheme, account.mfa, account.password_reset) == (PasswordScheme.BCRYPT, None, None)
    # The first sign-in replaces an imported hash with ours, once.
    assert not await users.upgrade_password_hash(user.id, "other", "$ours")
    assert await users.upgrade_password_hash(user.id, "$2b$10$hash", "$ours")
    assert not await users.upgrade_password_hash(user.id, "$ours", "$ours2")
    account = await users.get_account(user.id)
    assert account is not None
    assert (account.password_hash, account.password_scheme) == ("$ours", PasswordScheme.PEPPERED)
    assert await users.activate(user.id, "d1", NOW) is not None
    assert await users.start_mfa_enrollment(user.id, b"secret", NOW)
    assert await users.confirm_mfa(user.id, 7, ["r1", "r2"], NOW, NOTICE)
    account = await users.get_account(user.id)
    assert account is not None
    assert account.mfa == Mfa(active=True, sealed_secret=b"secret", last_used_step=7, recovery_digests=("r1", "r2"))
    assert account.user.mfa_enabled
    assert account.user.token_version == 1
    # A sealed TOTP secret is resealed only if it is still what was read.
    assert await users.sealed_totp_secrets(None, 10) == [(user.id, b"secret")]
    assert await users.sealed_totp_secrets(user.id, 10) == []
    assert not await users.reseal_totp_secret(user.id, b"other", b"new")
    assert await users.reseal_totp_secret(user.id, b"secret", b"new")
    account = await users.get_account(user.id)
    assert account is not None
    assert account.mfa is not None
    assert account.mfa.sealed_secret == b"new"


async def test_an_admins_mfa_reset_removes_any_enrollment_and_ends_tokens(stores: Stores) -> None:
    users = stores.users
    user = await users.add(new_user())
    assert not await users.reset_mfa(user.id, NOW, NOTICE)
    assert await users.start_mfa_enrollment(user.id, b"s", NOW)
    assert await users.reset_mfa(user.id, NOW, NOTICE)
    account = await users.get_account(user.id)
    assert account is not None
    assert (account.mfa, account.user.token_version) == (None, 1)
    assert not await users.reset_mfa(user.id, NOW, NOTICE)


async def test_a_session_reads_back_as_it_was_made(stores: Stores) -> None:
    sessions = stores.sessions
    session_id = sessions.new_id()
    made = await sessions.create(session_id, "u1", "t", NOW, NOW + timedelta(days=1), 3)
    assert made == Session(
        id=session_id,
        user_id="u1",
        created_at=NOW,
        last_used_at=NOW,
        expires_at=NOW + timedelta(days=1),
        token_version=3,
    )
    assert await sessions.list_active("u1", NOW) == [made]
    rotated = await sessions.rotate(session_id, 0, "t", "t2", NOW + timedelta(hours=1))
    assert rotated == dataclasses.replace(made, last_used_at=NOW + timedelta(hours=1))
    assert await sessions.rotate(session_id, 1, "t2", "t3", NOW + timedelta(days=1)) is None  # expired
    # Stored before sessions carried the token version: version 0, which the first tokens had.
    await stores.database["sessions"].update_one({"_id": ObjectId(session_id)}, {"$unset": {"token_version": ""}})
    [legacy] = await sessions.list_active("u1", NOW)
    assert legacy.token_version == 0


async def test_service_accounts_have_unique_names_and_never_read_back_their_secret(stores: Stores) -> None:
    accounts = stores.service_accounts
    await accounts.ensure_indexes()
    first = ServiceAccount(client_id=accounts.new_id(), name="billing", created_at=NOW)
    second = ServiceAccount(client_id=accounts.new_id(), name="reports", created_at=NOW)
    await accounts.add(first, "digest1")
    await accounts.add(second, "digest2")
    with pytest.raises(AlreadyExists) as error:
        await accounts.add(ServiceAccount(client_id=accounts.new_id(), name="billing", created_at=NOW), "d")
    assert error.value.field == "name"
    assert await accounts.get(first.client_id) == first
    assert await accounts.secret_digest(first.client_id) == "digest1"
    assert await accounts.secret_digest(accounts.new_id()) is None
    assert await accounts.list_after(None, 10) == [first, second]
    assert await accounts.list_after(first.client_id, 10) == [second]
    assert await accounts.list_after(None, 1) == [first]
    assert await accounts.delete(first.client_id)
    assert not await accounts.delete(first.client_id)
    assert await accounts.get(first.client_id) is None
    stored = await stores.database["service_accounts"].find_one({"_id": ObjectId(second.client_id)})
    assert stored is not None
    assert stored["secret_digest"] == "digest2"


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
