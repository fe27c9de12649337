"""More account rules on fakes: the last active admin, imports, account states, activation mails, overload."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import bcrypt
import pytest

from tests.support.logs import logged
from tests.support.world import PASSWORD, World, registration, run
from users_grpc.domain.errors import (
    AccountDeactivated,
    AccountLocked,
    AccountNotActive,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidActivationCode,
    InvalidArgument,
    InvalidCredentials,
    LastActiveAdmin,
    NotFound,
    Overloaded,
    PermissionDenied,
    StorageUnavailable,
    TooManyAttempts,
)
from users_grpc.domain.model import Caller, Gender, ImportedUser, PasswordScheme, Role, User, UserState
from users_grpc.domain.rules import MAX_IMPORTED_USERS
from users_grpc.services import last_admin
from users_grpc.services.accounts import AccountPolicy, no_reply_sooner_than
from users_grpc.services.throttling import ThrottlePolicy

SOURCE = "10.0.0.1"


def quick(**policy: Any) -> World:
    return World(AccountPolicy(reply_floor=timedelta(0), **policy))


@pytest.fixture
def world() -> World:
    return quick()


def set_state(world: World, user_id: str, state: UserState) -> None:
    account = world.users.accounts[user_id]
    world.users.accounts[user_id] = dataclasses.replace(account, user=dataclasses.replace(account.user, state=state))


def admin(world: World, name: str) -> User:
    return run(world.service.create_admin(registration(username=name, email=f"{name}@example.com")))


class TestLastActiveAdmin:
    def test_the_last_active_admin_cannot_be_deleted_and_stays_active(self, world: World) -> None:
        only = admin(world, "root")
        with pytest.raises(LastActiveAdmin):
            run(world.service.delete_user(only.id, password="", caller=Caller(user_id="f" * 24, role=Role.ADMIN)))
        assert world.users.accounts[only.id].user.state is UserState.ACTIVE
        with pytest.raises(LastActiveAdmin):
            run(world.service.delete_user_by_identifier("root"))
        assert world.users.accounts[only.id].user.is_active_admin

    def test_an_admin_goes_while_another_active_admin_stays(self, world: World) -> None:
        first, second = admin(world, "root"), admin(world, "toor")
        run(world.service.delete_user_by_identifier("ROOT@example.com"))
        assert first.id not in world.users.accounts
        with pytest.raises(LastActiveAdmin):
            run(world.service.delete_user(second.id, password=PASSWORD, caller=Caller(user_id=second.id)))

    def test_an_inactive_admin_is_no_active_admin(self, world: World) -> None:
        first, second = admin(world, "root"), admin(world, "toor")
        set_state(world, second.id, UserState.DEACTIVATED)
        with pytest.raises(LastActiveAdmin):
            run(world.service.delete_user_by_identifier("root"))
        run(world.service.delete_user_by_identifier("toor"))  # not active: may go
        assert set(world.users.accounts) == {first.id}

    def test_an_admin_locked_while_being_deleted_is_deleted_at_the_next_look(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The deactivation that comes before an active admin's deletion loses a race to a lock:
        the delete looks again, and a locked admin is no active admin, so it goes."""
        first, _ = admin(world, "root"), admin(world, "toor")
        change_state = world.users.change_state
        lost: list[str] = []

        async def locked_meanwhile(user_id: str, **change: Any) -> User | None:
            if not lost:
                lost.append(user_id)
                set_state(world, user_id, UserState.LOCKED)  # another call got there first
                return None
            return await change_state(user_id, **change)

        monkeypatch.setattr(world.users, "change_state", locked_meanwhile)
        run(world.service.delete_user_by_identifier("root"))
        assert first.id not in world.users.accounts
        assert lost == [first.id]

    def test_a_delete_cut_short_after_the_deactivation_leaves_the_admin_deactivated_at_that_time(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An active admin is deactivated before being deleted (a delete cannot be undone, a
        deactivation can): if the delete then fails, the admin is left deactivated, stamped."""
        first, _ = admin(world, "root"), admin(world, "toor")
        world.clock.advance(seconds=60)

        async def unavailable(user_id: str) -> bool:
            raise StorageUnavailable()

        monkeypatch.setattr(world.users, "delete", unavailable)
        with pytest.raises(StorageUnavailable):
            run(world.service.delete_user_by_identifier("root"))
        left = world.users.accounts[first.id].user
        assert (left.state, left.updated_at) == (UserState.DEACTIVATED, world.clock.now())

    @pytest.mark.parametrize("turn", ["held by a dead replica", "unreachable"])
    def test_a_removal_whose_count_gets_no_turn_is_undone_and_unavailable(
        self, world: World, monkeypatch: pytest.MonkeyPatch, log: pytest.LogCaptureFixture, turn: str
    ) -> None:
        """No count, no removal: the admin stays as they were, the caller may retry, the log says why."""
        first, _ = admin(world, "root"), admin(world, "toor")
        monkeypatch.setattr(last_admin, "_ADMIN_CHECK_WAIT_SECONDS", 0)
        if turn == "unreachable":

            async def unavailable(holder: str, lease_seconds: float) -> bool:
                raise StorageUnavailable()

            monkeypatch.setattr(world.users, "take_admin_check", unavailable)
        else:
            world.users.admin_check_holder = "a replica that died holding it"
        with pytest.raises(StorageUnavailable):
            run(world.service.delete_user_by_identifier("root"))
        assert world.users.accounts[first.id].user.is_active_admin
        logged(log, "change undone: no turn to count the active admins", user_id=first.id)

    def test_a_count_waits_for_a_turn_another_holds_briefly(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another replica's count holds the turn for two tries and releases it: the third try counts."""
        first, _ = admin(world, "root"), admin(world, "toor")
        take = world.users.take_admin_check
        tries: list[str] = []

        async def held_twice(holder: str, lease_seconds: float) -> bool:
            tries.append(holder)
            world.users.admin_check_holder = "another replica's count" if len(tries) <= 2 else None
            return await take(holder, lease_seconds)

        monkeypatch.setattr(world.users, "take_admin_check", held_twice)
        run(world.service.delete_user_by_identifier("root"))
        assert first.id not in world.users.accounts
        assert len(tries) == 3

    def test_a_count_holds_its_turn_against_every_other_holder_until_it_is_done(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While one count runs, another replica's try to take the turn fails; after it, the turn is free."""
        admin(world, "root"), admin(world, "toor")
        count = world.users.count_active_admins
        others: list[bool] = []

        async def another_replica_tries() -> int:
            others.append(await world.users.take_admin_check("another replica's count", 10))
            return await count()

        monkeypatch.setattr(world.users, "count_active_admins", another_replica_tries)
        run(world.service.delete_user_by_identifier("root"))
        assert others == [False]
        assert world.users.admin_check_holder is None

    def test_a_turn_not_released_leaves_the_removal_standing_and_is_logged(
        self, world: World, monkeypatch: pytest.MonkeyPatch, log: pytest.LogCaptureFixture
    ) -> None:
        """The release failing is no reason to fail the call: the lease runs out on its own."""
        first, _ = admin(world, "root"), admin(world, "toor")

        async def unavailable(holder: str) -> None:
            raise StorageUnavailable()

        monkeypatch.setattr(world.users, "release_admin_check", unavailable)
        run(world.service.delete_user_by_identifier("root"))
        assert first.id not in world.users.accounts
        logged(log, "the count of active admins not released; its lease runs out", user_id=first.id)

    def test_a_finished_check_leaves_nothing_behind(self, world: World) -> None:
        """The checks kept alive while they run are forgotten once settled."""
        admin(world, "root"), admin(world, "toor")
        run(world.service.delete_user_by_identifier("root"))
        assert not last_admin._checks

    def test_a_check_cancelled_at_shutdown_settles_quietly(self, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        """A check cancelled (as asyncio.run does to what is left) is forgotten and reports no error to the loop."""
        admin(world, "root"), admin(world, "toor")
        counting, never = asyncio.Event(), asyncio.Event()

        async def hangs() -> int:
            counting.set()
            await never.wait()
            return 1

        monkeypatch.setattr(world.users, "count_active_admins", hangs)

        async def scenario() -> list[dict[str, Any]]:
            errors: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
            caller = asyncio.ensure_future(world.service.delete_user_by_identifier("root"))
            await counting.wait()
            (check,) = last_admin._checks
            check.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            await asyncio.sleep(0)
            return errors

        assert run(scenario()) == []
        assert not last_admin._checks

    def test_an_admin_is_created_active_without_a_mail(self, world: World) -> None:
        created = admin(world, "root")
        assert (created.role, created.state) == (Role.ADMIN, UserState.ACTIVE)
        assert world.mailer.sent == []
        assert world.users.accounts[created.id].password_hash == f"hashed:{PASSWORD}"

    def test_deleting_nobody_by_identifier_is_not_found(self, world: World) -> None:
        with pytest.raises(NotFound):
            run(world.service.delete_user_by_identifier("nobody"))
        with pytest.raises(InvalidArgument):
            run(world.service.delete_user_by_identifier(" "))

    def test_a_user_who_keeps_changing_is_not_deleted(self, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        user = world.create()

        async def never(user_id: str) -> bool:
            return False

        monkeypatch.setattr(world.users, "delete_unless_active_admin", never)
        with pytest.raises(FailedPrecondition, match=r"^the user changed while being deleted; try again$"):
            run(world.service.delete_user(user.id, password="", caller=Caller(user_id="f" * 24, role=Role.ADMIN)))
        assert user.id in world.users.accounts


def imported(**changes: Any) -> ImportedUser:
    fields: dict[str, Any] = {
        "username": "jane",
        "first_name": " Jane ",
        "last_name": " Doe ",
        "email": "Jane@EXAMPLE.com",
        "gender": Gender.FEMALE,
        "role": Role.USER,
        "email_verified": True,
        "password_hash": "",
    }
    fields.update(changes)
    return ImportedUser(**fields)


IMPORTER = Caller(user_id="a" * 24, role=Role.ADMIN)


class TestImport:
    def test_each_item_is_created_or_refused_with_its_own_index(self, world: World) -> None:
        results = run(
            world.service.import_users(
                [
                    imported(),
                    imported(username="x", email="bad"),
                    InvalidArgument([]),
                    imported(username="other"),  # the email is taken
                    imported(username="john", email="john@example.com", email_verified=False),
                ],
                IMPORTER,
            )
        )
        first, invalid, unconverted, taken, pending = results
        assert isinstance(first, User)
        assert (first.first_name, first.last_name, first.email) == ("Jane", "Doe", "Jane@example.com")
        assert first.state is UserState.ACTIVE
        assert isinstance(invalid, InvalidArgument)
        assert {v.field for v in invalid.violations} == {"users[1].username", "users[1].email"}
        assert isinstance(unconverted, InvalidArgument)
        assert isinstance(taken, AlreadyExists)
        assert isinstance(pending, User)
        assert pending.state is UserState.PENDING_ACTIVATION
        assert world.users.accounts[pending.id].activation is None
        assert world.mailer.sent == []

    def test_an_unconverted_item_keeps_its_fields_under_its_index(self, world: World) -> None:
        (result,) = run(
            world.service.import_users([InvalidArgument([FieldViolation("gender", "unknown value 9")])], IMPORTER)
        )
        assert isinstance(result, InvalidArgument)
        assert [(v.field, v.description) for v in result.violations] == [("users[0].gender", "unknown value 9")]

    def test_a_batch_has_a_limit(self, world: World) -> None:
        with pytest.raises(InvalidArgument) as error:
            run(world.service.import_users([imported()] * (MAX_IMPORTED_USERS + 1), IMPORTER))
        assert [(v.field, v.description) for v in error.value.violations] == [
            ("users", f"at most {MAX_IMPORTED_USERS} users per call; split the batch")
        ]
        assert world.users.accounts == {}

    def test_an_imported_password_works_and_is_rehashed_at_the_first_sign_in(self, world: World) -> None:
        old_hash = bcrypt.hashpw(b"the old systems password", bcrypt.gensalt(4)).decode()
        (user,) = run(world.service.import_users([imported(password_hash=old_hash)], IMPORTER))
        assert isinstance(user, User)
        assert world.users.accounts[user.id].password_scheme is PasswordScheme.BCRYPT
        run(world.service.verify_credentials("jane", "the old systems password", source=SOURCE))
        account = world.users.accounts[user.id]
        assert (account.password_hash, account.password_scheme) == (
            "hashed:the old systems password",
            PasswordScheme.PEPPERED,
        )
        run(world.service.verify_credentials("jane", "the old systems password", source=SOURCE))

    def test_a_rehash_that_finds_the_queue_full_waits_for_a_later_sign_in(self, world: World) -> None:
        old_hash = bcrypt.hashpw(b"the old systems password", bcrypt.gensalt(4)).decode()
        (user,) = run(world.service.import_users([imported(password_hash=old_hash)], IMPORTER))
        assert isinstance(user, User)
        account = world.users.accounts[user.id]

        async def full(password: str) -> str:
            raise Overloaded()

        world.hasher.hash = full  # type: ignore[method-assign]
        assert run(world.service.verify_credentials("jane", "the old systems password", source=SOURCE)).id == user.id
        assert world.users.accounts[user.id] == account

    def test_an_imported_hash_costlier_than_the_policy_allows_is_refused(self) -> None:
        """A bcrypt cost above max_imported_hash_cost would make each sign-in too slow: refused, nothing stored."""
        world = quick(max_imported_hash_cost=4)
        costly = bcrypt.hashpw(b"the old systems password", bcrypt.gensalt(5)).decode()
        (result,) = run(world.service.import_users([imported(password_hash=costly)], IMPORTER))
        assert isinstance(result, InvalidArgument)
        assert world.users.accounts == {}

    def test_an_import_without_a_hash_has_no_password(self, world: World) -> None:
        (user,) = run(world.service.import_users([imported()], IMPORTER))
        assert isinstance(user, User)
        assert world.users.accounts[user.id].password_scheme is PasswordScheme.NONE
        with pytest.raises(InvalidCredentials):
            run(world.service.verify_credentials("jane", "any password at all", source=SOURCE))


class TestAccountStates:
    @pytest.mark.parametrize(
        ("state", "error"),
        [
            (UserState.PENDING_ACTIVATION, AccountNotActive),
            (UserState.DEACTIVATED, AccountDeactivated),
            (UserState.LOCKED, AccountLocked),
        ],
    )
    def test_an_inactive_account_is_told_its_state_after_the_right_password(
        self, world: World, state: UserState, error: type[Exception]
    ) -> None:
        user = world.create()
        set_state(world, user.id, state)
        with pytest.raises(error):
            run(world.service.verify_credentials("jane", PASSWORD, source=SOURCE))
        with pytest.raises(InvalidCredentials):
            run(world.service.verify_credentials("jane", "not the password", source=SOURCE))

    def test_a_full_hashing_queue_is_no_failed_try(self, world: World) -> None:
        user = world.create()
        set_state(world, user.id, UserState.ACTIVE)
        world.hasher.overloaded = Overloaded()
        for _ in range(10):
            with pytest.raises(Overloaded):
                run(world.service.verify_credentials("jane", PASSWORD, source=SOURCE))
        world.hasher.overloaded = None
        assert all(tally.count == 0 for _, kind, tally in world.throttles.tallies.values() if kind == "password")
        assert run(world.service.verify_credentials("jane", PASSWORD, source=SOURCE)).id == user.id

    def test_a_comparison_that_breaks_raises_its_own_error_and_counts_as_a_try(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A hasher that fails mid-comparison: its error reaches the caller, and the try is counted."""
        user = world.create()
        set_state(world, user.id, UserState.ACTIVE)

        async def broken(*args: Any) -> bool:
            raise RuntimeError("bcrypt broke")

        monkeypatch.setattr(world.hasher, "verify", broken)
        with pytest.raises(RuntimeError, match=r"^bcrypt broke$"):
            run(world.service.verify_credentials("jane", PASSWORD, source=SOURCE))
        counts = [tally.count for _, kind, tally in world.throttles.tallies.values() if kind == "password"]
        assert counts == [1, 1]  # the address's and the account's

    def test_a_caller_reading_themself_is_served_the_user_already_read(self, world: World) -> None:
        user = world.create()
        stale = dataclasses.replace(user, first_name="Read moments ago")
        assert run(world.service.get_user(user.id, caller=Caller(user_id=user.id, user=stale))) is stale
        assert run(world.service.get_user(user.id, caller=Caller(user_id=user.id))) == user

    def test_a_deactivated_account_gets_no_activation_mail(self, world: World) -> None:
        user = world.create()
        set_state(world, user.id, UserState.DEACTIVATED)
        world.mailer.sent.clear()
        run(world.service.resend_activation_code("jane"))
        assert world.mailer.sent == []


class TestActivationMail:
    def test_the_mail_gives_the_code_the_token_and_their_lifetimes(self) -> None:
        world = quick(activation_code_ttl=timedelta(minutes=20), activation_token_ttl=timedelta(hours=48))
        world.create()
        (mail,) = world.mailer.sent
        assert (mail.to, mail.subject) == ("jane@example.com", "Your activation code")
        assert mail.body == (
            "Hello jane,\n\n"
            f"your activation code is {world.last_code()}\n\n"
            "It works once and expires in 20 minutes.\n\n"
            # One sentence: the transport wraps it, no stray line break in the template.
            "If the code stops working, activate with this token instead; it works once and expires in 48 hours:\n\n"
            f"{world.last_token()}\n\n"
            "If you did not create an account, ignore this email.\n"
        )

    def test_the_token_outlives_the_code_until_its_own_expiry(self, world: World) -> None:
        world.create()
        token = world.last_token()
        world.clock.advance(hours=23, minutes=59)
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", world.last_code()))
        assert run(world.service.activate_user("jane", "", token=token)).is_active

    def test_the_token_expires(self, world: World) -> None:
        world.create()
        world.clock.advance(hours=24)
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", "", token=world.last_token()))

    def test_the_code_has_its_attempts_from_the_policy(self) -> None:
        world = quick(activation_max_attempts=2)
        world.create()
        code = world.last_code()
        for _ in range(2):
            with pytest.raises(InvalidActivationCode):
                run(world.service.activate_user("jane", f"{(int(code) + 1) % 1_000_000:06d}"))
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", code))

    def test_resends_follow_the_policys_cap_and_window(self) -> None:
        world = quick(activation_max_sends=2, activation_send_window=timedelta(minutes=10))
        world.create()
        for _ in range(3):
            run(world.service.resend_activation_code("jane"))
        assert len(world.mailer.sent) == 2
        world.clock.advance(minutes=10, seconds=1)
        run(world.service.resend_activation_code("jane"))
        assert len(world.mailer.sent) == 3
        account = world.users.accounts[next(iter(world.users.accounts))]
        assert account.activation is not None
        assert account.activation.window_started_at == world.clock.now()


def test_a_reply_is_held_back_to_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor waits out what the work left of it, on success and failure alike."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def calls() -> None:
        async with no_reply_sooner_than(timedelta(seconds=5)):
            pass
        with pytest.raises(InvalidCredentials):
            async with no_reply_sooner_than(timedelta(seconds=5)):
                raise InvalidCredentials()
        async with no_reply_sooner_than(timedelta(0)):
            pass

    asyncio.run(calls())
    assert len(slept) == 3
    assert 4.5 < slept[0] <= 5
    assert 4.5 < slept[1] <= 5
    assert slept[2] == 0


class TestRecorded:
    """What a new account holds, and the events an operator follows in the log."""

    def test_a_registration_is_stored_as_given_tidied(self, world: World, log: pytest.LogCaptureFixture) -> None:
        world.clock.advance(hours=1)
        user = world.create(first_name=" Jane ", last_name=" Doe ", email="Jane@EXAMPLE.com", gender=Gender.FEMALE)
        stored = world.users.accounts[user.id].user
        assert (stored.first_name, stored.last_name, stored.email) == ("Jane", "Doe", "Jane@example.com")
        assert (stored.gender, stored.role, stored.created_at) == (Gender.FEMALE, Role.USER, world.clock.now())
        logged(log, "user created", user_id=user.id)
        with pytest.raises(PermissionDenied, match=r"^only an admin can create an admin$"):
            world.create(username="eve", email="eve@example.com", role=Role.ADMIN)

    def test_an_import_is_stored_as_given_tidied(self, world: World) -> None:
        world.clock.advance(hours=1)
        (user,) = run(world.service.import_users([imported(gender=Gender.MALE, role=Role.ADMIN)], IMPORTER))
        assert isinstance(user, User)
        stored = world.users.accounts[user.id].user
        assert (stored.first_name, stored.last_name, stored.email) == ("Jane", "Doe", "Jane@example.com")
        assert (stored.gender, stored.role, stored.created_at) == (Gender.MALE, Role.ADMIN, world.clock.now())

    def test_imported_users_are_marked_imported_and_registered_ones_are_not(self, world: World) -> None:
        """Housekeeping spares imported users that wait for activation (they never got a code)."""
        (imported_user,) = run(world.service.import_users([imported(email_verified=False)], IMPORTER))
        assert isinstance(imported_user, User)
        registered = world.create(username="john", email="john@example.com")
        assert world.users.imported == {imported_user.id}
        assert registered.id not in world.users.imported

    def test_activation_events_are_logged(self, world: World, log: pytest.LogCaptureFixture) -> None:
        user = world.create()
        code, token = world.last_code(), world.last_token()
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", f"{(int(code) + 1) % 1_000_000:06d}"))
        logged(log, "activation refused", user_id=user.id)
        log.clear()
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", "", token="not the token"))
        logged(log, "activation refused", user_id=user.id)
        run(world.service.activate_user("jane", "", token=token))
        logged(log, "user activated", user_id=user.id)
        other = world.create(username="john", email="john@example.com")
        log.clear()
        run(world.service.activate_user("john", world.last_code()))
        logged(log, "user activated", user_id=other.id)

    def test_a_resent_mail_carries_a_working_token(self, world: World, log: pytest.LogCaptureFixture) -> None:
        user = world.create()
        run(world.service.resend_activation_code("jane"))
        assert run(world.service.activate_user("jane", "", token=world.last_token())).id == user.id
        capped = world.create(username="john", email="john@example.com")
        for _ in range(5):
            run(world.service.resend_activation_code("john"))
        logged(log, "activation resend capped", user_id=capped.id)

    def test_sign_in_events_are_logged(self, world: World, log: pytest.LogCaptureFixture) -> None:
        user = world.create()
        set_state(world, user.id, UserState.ACTIVE)
        run(world.service.verify_credentials("jane", PASSWORD, source=SOURCE))
        logged(log, "credentials verified", user_id=user.id)
        with pytest.raises(InvalidCredentials):
            run(world.service.verify_credentials("jane", "not the password", source=SOURCE))
        with pytest.raises(InvalidCredentials):
            run(world.service.verify_credentials("nobody", "not the password", source=SOURCE))
        refusals = [r for r in log.records if r.getMessage() == "credentials refused"]
        assert [getattr(r, "user_id", "missing") for r in refusals] == [user.id, None]

    def test_guesses_at_one_unknown_account_do_not_hold_another(self) -> None:
        world = World(AccountPolicy(reply_floor=timedelta(0)), ThrottlePolicy(free_attempts=2))
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                run(world.service.verify_credentials("ghost", "not the password", source=SOURCE))
        with pytest.raises(TooManyAttempts):
            run(world.service.verify_credentials("ghost", "not the password", source=SOURCE))
        with pytest.raises(InvalidCredentials):
            run(world.service.verify_credentials("phantom", "not the password", source=SOURCE))

    def test_a_wrong_password_to_delete_oneself_counts_for_its_address_only(self) -> None:
        world = World(AccountPolicy(reply_floor=timedelta(0)), ThrottlePolicy(free_attempts=2))
        user = world.create()
        elsewhere = Caller(user_id=user.id, source="10.6.6.6")
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                run(world.service.delete_user(user.id, password="not the password", caller=elsewhere))
        with pytest.raises(TooManyAttempts):
            run(world.service.delete_user(user.id, password=PASSWORD, caller=elsewhere))
        run(world.service.delete_user(user.id, password=PASSWORD, caller=Caller(user_id=user.id, source=SOURCE)))
        assert user.id not in world.users.accounts

    def test_deletions_and_admins_are_logged(self, world: World, log: pytest.LogCaptureFixture) -> None:
        first, second = admin(world, "root"), admin(world, "toor")
        created = [getattr(r, "user_id", None) for r in log.records if r.getMessage() == "admin created"]
        assert created == [first.id, second.id]
        run(world.service.delete_user(first.id, password="", caller=Caller(user_id=second.id, role=Role.ADMIN)))
        logged(log, "user deleted", user_id=first.id)
        user = world.create()
        run(world.service.delete_user_by_identifier("jane"))
        logged(log, "user deleted by identifier", user_id=user.id)
        world.clock.advance(minutes=1)
        with pytest.raises(LastActiveAdmin):
            run(world.service.delete_user_by_identifier("toor"))
        logged(log, "change refused: it would leave no active admin", user_id=second.id)
        assert world.users.accounts[second.id].user.updated_at == world.clock.now()  # the undo's time

    def test_imports_are_logged(self, world: World, log: pytest.LogCaptureFixture) -> None:
        old_hash = bcrypt.hashpw(b"the old systems password", bcrypt.gensalt(4)).decode()
        results = run(
            world.service.import_users(
                [imported(password_hash=old_hash), imported(username="x", email="bad"), imported(username="y")],
                IMPORTER,
            )
        )
        user = results[0]
        assert isinstance(user, User)
        logged(log, "user imported", user_id=user.id, active=True)
        logged(log, "users imported", admin_id=IMPORTER.user_id, users_requested=3, users_created=1, users_refused=2)
        run(world.service.verify_credentials("jane", "the old systems password", source=SOURCE))
        logged(log, "imported password hash replaced", user_id=user.id)

    def test_a_postponed_rehash_is_logged(self, world: World, log: pytest.LogCaptureFixture) -> None:
        old_hash = bcrypt.hashpw(b"the old systems password", bcrypt.gensalt(4)).decode()
        (user,) = run(world.service.import_users([imported(password_hash=old_hash)], IMPORTER))
        assert isinstance(user, User)

        async def full(password: str) -> str:
            raise Overloaded()

        world.hasher.hash = full  # type: ignore[method-assign]
        run(world.service.verify_credentials("jane", "the old systems password", source=SOURCE))
        logged(log, "imported password hash kept for now: hashing queue full", user_id=user.id)

    def test_a_batch_of_exactly_the_limit_is_taken(self, world: World) -> None:
        results = run(world.service.import_users([imported(email="bad")] * MAX_IMPORTED_USERS, IMPORTER))
        assert len(results) == MAX_IMPORTED_USERS

    def test_a_user_demoted_while_being_deleted_is_deleted_at_the_next_look(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        user = world.create()
        real = world.users.delete_unless_active_admin
        looks: list[str] = []

        async def first_time_an_admin(user_id: str) -> bool:
            looks.append(user_id)
            return len(looks) > 1 and await real(user_id)

        monkeypatch.setattr(world.users, "delete_unless_active_admin", first_time_an_admin)
        run(world.service.delete_user(user.id, password="", caller=Caller(user_id="f" * 24, role=Role.ADMIN)))
        assert user.id not in world.users.accounts
        assert looks == [user.id, user.id]
