"""Rules of the account updates against the real database, each checked on one of several users
(so an update that finds the wrong user, or every user, shows): what a token-version bump ends,
what a profile update stores, returns and publishes, a role change, the notices and changes of
resets, the caps on codes sent and second-factor attempts, and the senders' notice claims."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from bson import ObjectId

from tests.support.records import NOW, activation, new_user, notices_waiting
from tests.support.stores import Stores
from users_grpc.domain.model import (
    ActivationCode,
    ChangeType,
    Gender,
    Mail,
    PendingEmailChange,
    ProfileChanges,
    Role,
    User,
    UserChange,
    UserState,
    Version,
)

LATER = NOW + timedelta(hours=1)
SECOND = timedelta(seconds=1)


async def active_users(stores: Stores, *names: str, role: Role = Role.USER) -> list[User]:
    made = []
    for name in names:
        user = await stores.users.add(dataclasses.replace(new_user(name, f"{name}@example.com"), role=role))
        activated = await stores.users.activate(user.id, "d1", NOW)
        assert activated is not None
        made.append(activated)
    return made


async def newest_change(stores: Stores) -> UserChange:
    changes = stores.changes
    [change] = await changes.read_after(await changes.last_sequence() - 1, 10)
    return change


async def pend_reset_and_address_change(stores: Stores, *people: User) -> ActivationCode:
    """A password reset and a change of address (to new.<username>@example.com) pending for each
    of ``people``, under one code, which it returns."""
    code = activation(digest="reset", expires_at=LATER + timedelta(hours=1))
    for user in people:
        assert await stores.users.replace_password_reset(user.id, code, max_sends=3, window_seconds=60)
        change = PendingEmailChange(new_email=f"new.{user.username}@example.com", code=code)
        assert await stores.users.pend_email_change(user.id, change, max_sends=3, window_seconds=60)
    return code


async def test_bumping_the_token_version_ends_pending_resets_and_email_changes_of_that_user_only(
    stores: Stores,
) -> None:
    users = stores.users
    jane, joe = await active_users(stores, "jane", "joe")
    code = await pend_reset_and_address_change(stores, jane, joe)
    await users.bump_token_version(jane.id, LATER)
    await users.bump_token_version(jane.id, LATER + SECOND)
    bumped = await users.get_account(jane.id)
    assert bumped is not None
    assert (bumped.user.token_version, bumped.user.updated_at, bumped.password_reset) == (
        jane.token_version + 2,
        LATER + SECOND,
        None,
    )
    assert await users.find_account_by_reset_digest(jane.id, "reset", NOW) is None
    assert await users.reserve_email_change_attempt(jane.id, NOW) is None
    untouched = await users.get_account(joe.id)
    assert untouched is not None
    assert (untouched.user, untouched.password_reset) == (joe, code)
    reserved = await users.reserve_email_change_attempt(joe.id, NOW)
    assert reserved is not None
    assert reserved.new_email == "new.joe@example.com"


async def test_a_profile_update_changes_that_user_alone_returns_it_as_stored_and_publishes_it(stores: Stores) -> None:
    users = stores.users
    jane, joe, ann = await active_users(stores, "jane", "joe", "ann")
    changes = ProfileChanges(first_name="Joseph", gender=Gender.MALE)
    updated = await users.update_profile(joe.id, changes, None, LATER)
    assert updated == dataclasses.replace(
        joe, first_name="Joseph", gender=Gender.MALE, revision=joe.revision + 1, updated_at=LATER
    )
    assert await users.get(joe.id) == updated
    assert [await users.get(jane.id), await users.get(ann.id)] == [jane, ann]
    change = await newest_change(stores)
    assert (change.user_id, change.type, change.changed_at, change.user) == (
        joe.id,
        ChangeType.UPDATED,
        LATER,
        updated,
    )
    renamed = await users.update_profile(joe.id, ProfileChanges(username="joey"), None, LATER + SECOND)
    assert renamed == dataclasses.replace(
        updated, username="joey", revision=updated.revision + 1, updated_at=LATER + SECOND
    )
    change = await newest_change(stores)
    assert (change.user_id, change.type, change.user) == (joe.id, ChangeType.UPDATED, renamed)


async def test_a_profile_update_against_a_version_applies_only_while_revision_and_time_both_match(
    stores: Stores,
) -> None:
    users = stores.users
    [jane] = await active_users(stores, "jane")
    first = await users.update_profile(jane.id, ProfileChanges(first_name="J"), None, LATER)
    assert first is not None
    read = Version(revision=first.revision, updated_at=first.updated_at)
    # Within one millisecond of the first: only the revision tells the versions apart.
    second = await users.update_profile(jane.id, ProfileChanges(last_name="D"), read, LATER)
    assert second is not None
    assert (second.revision, second.updated_at, second.last_name) == (first.revision + 1, LATER, "D")
    assert await users.update_profile(jane.id, ProfileChanges(last_name="stale"), read, LATER) is None
    assert await users.get(jane.id) == second


async def test_a_role_change_is_stored_at_its_time_and_published(stores: Stores) -> None:
    users = stores.users
    jane, joe = await active_users(stores, "jane", "joe")
    assert await users.set_role(joe.id, Role.ADMIN, LATER) == joe
    promoted = await users.get(joe.id)
    assert promoted == dataclasses.replace(joe, role=Role.ADMIN, updated_at=LATER)
    change = await newest_change(stores)
    assert (change.user_id, change.type, change.changed_at, change.user) == (
        joe.id,
        ChangeType.ROLE_CHANGED,
        LATER,
        promoted,
    )
    assert await users.get(jane.id) == jane


async def test_an_admins_mfa_reset_is_published_at_once_and_its_notice_is_due_at_its_time(stores: Stores) -> None:
    users = stores.users
    jane, joe = await active_users(stores, "jane", "joe")
    for user in (jane, joe):
        assert await users.start_mfa_enrollment(user.id, b"s", NOW)
    notice = Mail(to="jane@example.com", subject="MFA reset", body="b")
    assert await users.reset_mfa(jane.id, LATER, notice)
    change = await newest_change(stores)
    assert (change.user_id, change.type, change.changed_at) == (jane.id, ChangeType.UPDATED, LATER)
    assert await notices_waiting(stores.users, LATER - SECOND) == []
    assert await notices_waiting(stores.users, LATER) == [notice]
    joes = await users.get_account(joe.id)
    assert joes is not None
    assert joes.mfa is not None


async def test_a_password_reset_is_stored_at_its_time_and_its_notice_is_due_then(stores: Stores) -> None:
    users = stores.users
    [jane] = await active_users(stores, "jane")
    code = activation(digest="reset", expires_at=LATER + timedelta(hours=1))
    assert await users.replace_password_reset(jane.id, code, max_sends=3, window_seconds=60)
    notice = Mail(to="jane@example.com", subject="Password reset", body="b")
    assert await users.reset_password(jane.id, "reset", "$new", LATER, notice)
    account = await users.get_account(jane.id)
    assert account is not None
    assert (account.password_hash, account.user.updated_at) == ("$new", LATER)
    assert await notices_waiting(stores.users, LATER - SECOND) == []
    assert await notices_waiting(stores.users, LATER) == [notice]


async def test_a_confirmed_email_change_pends_its_notice_to_the_old_address(stores: Stores) -> None:
    users = stores.users
    [jane] = await active_users(stores, "jane")
    code = activation(digest="change", expires_at=LATER + timedelta(hours=1))
    change = PendingEmailChange(new_email="new@example.com", code=code)
    assert await users.pend_email_change(jane.id, change, max_sends=3, window_seconds=60)
    notice = Mail(to="jane@example.com", subject="Your address changed", body="b")
    swapped = await users.confirm_email_change(jane.id, "new@example.com", "change", LATER, notice)
    assert swapped is not None
    assert swapped[1].email == "new@example.com"
    assert await notices_waiting(stores.users, LATER) == [notice]


async def test_codes_are_sent_at_most_max_sends_times_in_a_window_and_an_email_change_tried_attempts_left_times(
    stores: Stores,
) -> None:
    users = stores.users
    jane, joe = await active_users(stores, "jane", "joe")
    code = activation(digest="code", expires_at=LATER, attempts_left=2)
    sent = [await users.replace_password_reset(jane.id, code, max_sends=3, window_seconds=60) for _ in range(4)]
    assert sent == [True, True, True, False]
    change = PendingEmailChange(new_email="new@example.com", code=code)
    sent = [await users.pend_email_change(joe.id, change, max_sends=3, window_seconds=60) for _ in range(4)]
    assert sent == [True, True, True, False]
    tries = [await users.reserve_email_change_attempt(joe.id, NOW) for _ in range(3)]
    assert [None if tried is None else tried.code.attempts_left for tried in tries] == [1, 0, None]


async def test_a_second_factor_that_works_ends_the_run_of_failed_attempts_and_each_code_works_once(
    stores: Stores,
) -> None:
    users = stores.users
    jane, joe = await active_users(stores, "jane", "joe")

    async def attempts_left() -> int:
        allowed = 0
        while await users.reserve_mfa_attempt(jane.id, NOW, max_attempts=3, window_seconds=60):
            allowed += 1
        return allowed

    # No enrollment: nothing to count, and no enrollment made by counting.
    assert not await users.reserve_mfa_attempt(joe.id, NOW, max_attempts=3, window_seconds=60)
    account = await users.get_account(joe.id)
    assert account is not None
    assert account.mfa is None
    assert await users.start_mfa_enrollment(jane.id, b"s", NOW)
    assert await attempts_left() == 3
    notice = Mail(to="jane@example.com", subject="s", body="b")
    assert await users.confirm_mfa(jane.id, 1, ["r1", "r2"], NOW, notice)
    assert await attempts_left() == 3
    assert await users.use_totp_step(jane.id, 3)
    assert not await users.use_totp_step(jane.id, 3)
    assert not await users.use_totp_step(jane.id, 2)
    assert await attempts_left() == 3
    assert await users.use_recovery_code(jane.id, "r1")
    assert not await users.use_recovery_code(jane.id, "r1")
    assert await attempts_left() == 3
    account = await users.get_account(jane.id)
    assert account is not None
    assert account.mfa is not None
    assert (account.mfa.last_used_step, account.mfa.recovery_digests) == (3, ("r2",))


async def test_only_an_active_admin_is_kept_from_deletion(stores: Stores) -> None:
    users = stores.users
    [user] = await active_users(stores, "user")
    admin, former = await active_users(stores, "admin", "former", role=Role.ADMIN)
    active = frozenset({UserState.ACTIVE})
    assert await users.change_state(former.id, from_states=active, to=UserState.DEACTIVATED, now=NOW)
    assert not await users.delete_unless_active_admin(admin.id)
    assert await users.delete_unless_active_admin(user.id)
    assert await users.delete_unless_active_admin(former.id)
    assert [await users.get(u.id) for u in (user, admin, former)] == [None, admin, None]


async def test_notices_are_claimed_oldest_first_and_a_lapsed_claim_no_longer_releases_them(stores: Stores) -> None:
    users = stores.users
    # The later notice is stored first, so the claim must go by its time.
    later, sooner = await active_users(stores, "later", "sooner")
    for user, at in ((later, NOW + SECOND), (sooner, NOW)):
        assert await users.set_password(user.id, "$h", at, Mail(to=user.email, subject="s", body="b"))
    lapsed = await users.claim_pending_notices(NOW + SECOND, 60)
    assert lapsed is not None
    assert lapsed.user_id == sooner.id
    # Its sender stalled past its lease: another sender takes the notices over.
    taken_over = await users.claim_pending_notices(NOW + 62 * SECOND, 60)
    assert taken_over is not None
    assert (taken_over.user_id, taken_over.notices) == (sooner.id, lapsed.notices)
    assert taken_over.claim != lapsed.claim
    await users.release_notices(lapsed)
    [notice] = taken_over.notices
    assert await users.settle_notice(sooner.id, notice.id, NOW + 63 * SECOND) == NOW + 122 * SECOND
    await users.release_notices(taken_over)
    assert await users.settle_notice(sooner.id, notice.id, NOW + 63 * SECOND) is None


async def test_suspending_a_user_ends_its_pending_reset_and_email_change_and_stamps_that_user_only(
    stores: Stores,
) -> None:
    users = stores.users
    jane, joe = await active_users(stores, "jane", "joe")
    code = await pend_reset_and_address_change(stores, jane, joe)
    before = await users.change_state(
        jane.id, from_states=frozenset({UserState.ACTIVE}), to=UserState.LOCKED, now=LATER
    )
    assert before is not None
    assert before.state is UserState.ACTIVE  # as it was, for the caller to undo or announce
    locked = await users.get_account(jane.id)
    assert locked is not None
    assert (locked.user.state, locked.user.is_active, locked.user.updated_at) == (UserState.LOCKED, False, LATER)
    # Nothing mailed earlier may complete once suspended.
    assert (locked.password_reset, locked.activation) == (None, None)
    stored = await stores.database["users"].find_one({"_id": ObjectId(jane.id)})
    assert stored is not None
    assert "email_change" not in stored  # not merely refused while locked: gone for good
    untouched = await users.get_account(joe.id)
    assert untouched is not None
    assert (untouched.user, untouched.password_reset) == (joe, code)
    assert await users.reserve_email_change_attempt(joe.id, NOW) is not None
