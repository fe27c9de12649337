"""What each account update of the repository changes besides its own field, against the real
database: a new password ends pending tokens and an imported scheme, removing MFA ends tokens,
every change is published at its time with its notice claimable, activation tokens, attempt caps,
notice claims' leases, and a user created active or waiting for activation."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from bson import ObjectId

from tests.support.records import NOW, activation, new_user, notices_waiting
from tests.support.stores import Stores
from users_grpc.domain.model import ChangeType, Mail, PasswordScheme, PendingEmailChange, UserState

NOTICE = Mail(to="jane@example.com", subject="Notice", body="Hello jane")
LATER = NOW + timedelta(hours=1)


async def active_user(stores: Stores, **changes: Any) -> str:
    user = await stores.users.add(dataclasses.replace(new_user(), **changes))
    assert await stores.users.activate(user.id, "d1", NOW) is not None
    return user.id


async def test_a_new_password_ends_pending_tokens_and_an_imported_scheme(stores: Stores) -> None:
    users = stores.users
    user_id = await active_user(stores, password_scheme=PasswordScheme.BCRYPT)
    code = activation(digest="reset", expires_at=LATER + timedelta(hours=1))
    assert await users.replace_password_reset(user_id, code, max_sends=3, window_seconds=60)
    pending = await users.get_account(user_id)
    assert pending is not None
    assert pending.password_reset == code
    change = PendingEmailChange(new_email="new@example.com", code=activation(digest="change", expires_at=LATER))
    assert await users.pend_email_change(user_id, change, max_sends=3, window_seconds=60)
    assert await users.set_password(user_id, "$ours", LATER, NOTICE)
    account = await users.get_account(user_id)
    assert account is not None
    assert (account.password_hash, account.password_scheme, account.password_reset) == (
        "$ours",
        PasswordScheme.PEPPERED,
        None,
    )
    assert (account.user.updated_at, account.user.token_version) == (LATER, 1)
    assert await users.reserve_email_change_attempt(user_id, NOW) is None
    assert await users.find_account_by_reset_digest(user_id, "reset", NOW) is None
    assert await notices_waiting(stores.users, LATER - timedelta(seconds=1)) == []
    assert await notices_waiting(stores.users, LATER) == [NOTICE]


async def test_mfa_removed_ends_tokens_is_published_and_told_at_its_time(stores: Stores) -> None:
    users, changes = stores.users, stores.changes
    user_id = await active_user(stores)
    assert await users.start_mfa_enrollment(user_id, b"s", NOW)
    assert await users.confirm_mfa(user_id, 1, ["r"], NOW, NOTICE)
    assert await notices_waiting(stores.users, NOW) == [NOTICE]
    bye = Mail(to="jane@example.com", subject="MFA off", body="b")
    assert await users.disable_mfa(user_id, LATER, bye)
    account = await users.get_account(user_id)
    assert account is not None
    assert (account.mfa, account.user.mfa_enabled) == (None, False)
    assert (account.user.updated_at, account.user.token_version) == (LATER, 2)
    feed = await changes.read_after(0, 10)
    assert [(c.number, c.type, c.changed_at) for c in feed] == [
        (1, ChangeType.CREATED, NOW),
        (2, ChangeType.ACTIVATED, NOW),
        (3, ChangeType.UPDATED, NOW),
        (4, ChangeType.UPDATED, LATER),
    ]
    assert feed[-1].user is not None
    assert not feed[-1].user.mfa_enabled
    assert await notices_waiting(stores.users, LATER - timedelta(seconds=1)) == []
    assert await notices_waiting(stores.users, LATER) == [bye]
    stored = await stores.database["users"].find_one({"_id": ObjectId(user_id)})
    assert stored is not None
    assert stored["change_number"] == 4
    assert "mfa" not in stored


async def test_an_activation_is_published_at_its_time_and_a_token_activates_until_it_expires(stores: Stores) -> None:
    users, changes = stores.users, stores.changes
    code = activation(token_digest="token", token_expires_at=NOW + timedelta(hours=2))
    user = await users.add(dataclasses.replace(new_user(), activation=code))
    account = await users.get_account(user.id)
    assert account is not None
    assert account.activation == code
    assert await users.activate_with_token(user.id, "wrong", LATER) is None
    assert await users.activate_with_token(user.id, "token", NOW + timedelta(hours=2)) is None
    activated = await users.activate_with_token(user.id, "token", LATER)
    assert activated is not None
    assert (activated.state, activated.updated_at) == (UserState.ACTIVE, LATER)
    assert await users.activate_with_token(user.id, "token", LATER) is None
    [change] = await changes.read_after(1, 10)
    assert (change.type, change.changed_at, change.user) == (ChangeType.ACTIVATED, LATER, activated)
    stored = await stores.database["users"].find_one({"_id": ObjectId(user.id)})
    assert stored is not None
    assert "activation" not in stored


async def test_a_code_stored_before_activation_tokens_reads_back_without_one(stores: Stores) -> None:
    user = await stores.users.add(new_user())
    await stores.database["users"].update_one(
        {"_id": ObjectId(user.id)}, {"$unset": {"activation.token_digest": "", "activation.token_expires_at": ""}}
    )
    account = await stores.users.get_account(user.id)
    assert account is not None
    assert account.activation == activation()
    assert await stores.users.activate_with_token(user.id, "", NOW) is None


async def test_a_reactivation_is_named_by_the_state_it_left(stores: Stores) -> None:
    users, changes = stores.users, stores.changes
    suspended = frozenset({UserState.LOCKED, UserState.DEACTIVATED})
    pending = await users.add(new_user())
    for state in (UserState.LOCKED, UserState.DEACTIVATED):
        user_id = await active_user(stores, username=state.value, email=f"{state.value}@example.com")
        assert await users.change_state(user_id, from_states=frozenset({UserState.ACTIVE}), to=state, now=NOW)
        before = await users.change_state(user_id, from_states=suspended, to=UserState.ACTIVE, now=LATER)
        assert before is not None
        assert before.state is state
        assert await users.change_state(user_id, from_states=suspended, to=UserState.ACTIVE, now=LATER) is None
    assert await users.change_state(
        pending.id, from_states=frozenset({UserState.PENDING_ACTIVATION}), to=UserState.ACTIVE, now=LATER
    )  # fmt: skip
    feed = await changes.read_after(0, 20)
    assert [c.type for c in feed if c.changed_at == LATER] == [
        ChangeType.UNLOCKED,
        ChangeType.REACTIVATED,
        ChangeType.ACTIVATED,
    ]


async def test_a_change_of_address_pends_its_notice_with_the_code(stores: Stores) -> None:
    user_id = await active_user(stores)
    code = activation(digest="change", window_started_at=LATER)
    change = PendingEmailChange(new_email="new@example.com", code=code)
    assert await stores.users.pend_email_change(user_id, change, max_sends=3, window_seconds=60, notice=NOTICE)
    assert await notices_waiting(stores.users, LATER - timedelta(seconds=1)) == []
    assert await notices_waiting(stores.users, LATER) == [NOTICE]


async def test_second_factor_attempts_count_one_each_up_to_the_cap(stores: Stores) -> None:
    user_id = await active_user(stores)
    assert await stores.users.start_mfa_enrollment(user_id, b"s", NOW)
    reserve = stores.users.reserve_mfa_attempt
    results = [await reserve(user_id, NOW, max_attempts=4, window_seconds=60) for _ in range(5)]
    assert results == [True, True, True, True, False]


async def test_a_notice_claim_holds_until_its_lease_ends_and_not_at_its_end(stores: Stores) -> None:
    users = stores.users
    user = await users.add(new_user())
    assert await users.set_password(user.id, "$2b$10$new", NOW, NOTICE)
    claimed = await users.claim_pending_notices(NOW, 60)
    assert claimed is not None
    [notice] = claimed.notices
    end = NOW + timedelta(seconds=60)
    assert await users.settle_notice(user.id, notice.id, end - timedelta(milliseconds=1)) == end
    assert await users.claim_pending_notices(end - timedelta(milliseconds=1), 60) is None
    # At its end the lease is over: another sender takes the notice over (its sender died) ...
    taken_over = await users.claim_pending_notices(end, 60)
    assert taken_over is not None
    assert taken_over.notices == claimed.notices
    assert await users.settle_notice(user.id, notice.id, end) == end + timedelta(seconds=60)
    # ... or, once that lease ends too, the outbox copy settles it, and no sender finds it any more.
    assert await users.settle_notice(user.id, notice.id, end + timedelta(seconds=60)) is None
    assert await users.claim_pending_notices(end + timedelta(seconds=60), 60) is None


async def test_a_pending_claim_whose_user_does_not_exist_finds_nobody(stores: Stores) -> None:
    users = stores.users
    users.lookups_by_claim = True
    user = await users.add(new_user())
    assert await stores.claims.claim("username", "ghost", ObjectId(), NOW) is not None
    assert await users.find_account("ghost") is None
    account = await users.find_account("jane@example.com")
    assert account is not None
    assert account.user.id == user.id
    assert await users.delete_by_identifier("jane")
    assert await users.find_account("jane") is None
    assert not await users.delete_by_identifier("jane")


async def test_a_registered_user_waits_for_activation_and_one_created_active_is_active(stores: Stores) -> None:
    users = stores.users
    registered = await users.add(new_user())
    created_active = await users.add(dataclasses.replace(new_user("joe", "joe@example.com"), is_active=True))
    assert (registered.state, created_active.state) == (UserState.PENDING_ACTIVATION, UserState.ACTIVE)
    assert [await users.get(registered.id), await users.get(created_active.id)] == [registered, created_active]
    account = await users.find_account("jane")
    assert account is not None
    assert not account.user.is_active
