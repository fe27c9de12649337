"""The account lifecycle on fakes: rules and edge cases, fast.

tests/e2e covers the same behaviour through gRPC on the real database and SMTP.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from tests.support.codes import codes_other_than
from tests.support.world import PASSWORD, World, registration, run
from users_grpc.adapters.bcrypt_hasher import common_passwords
from users_grpc.domain.errors import (
    AccountNotActive,
    AlreadyExists,
    InvalidActivationCode,
    InvalidArgument,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    TooManyAttempts,
)
from users_grpc.domain.model import Caller, Role
from users_grpc.domain.rules import PasswordPolicy
from users_grpc.services.accounts import AccountPolicy
from users_grpc.services.throttling import ThrottlePolicy

ADMIN = Caller(user_id="a" * 24, role=Role.ADMIN)


@pytest.fixture
def world() -> World:
    return World()


def violated_fields(error: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {violation.field for violation in error.value.violations}


class TestCreateUser:
    def test_creates_an_inactive_user_and_mails_a_code(self, world: World) -> None:
        """A new user is inactive, and the mail to them carries a six-digit code."""
        user = world.create()
        assert user.is_active is False
        assert user.role is Role.USER
        assert world.mailer.sent[0].to == "jane@example.com"
        assert re.fullmatch(r"\d{6}", world.last_code())

    def test_stores_the_password_hashed(self, world: World) -> None:
        """The repository receives the hasher's output, never the password."""
        user = world.create()
        assert world.users.accounts[user.id].password_hash == f"hashed:{PASSWORD}"

    def test_taken_email_in_other_case_is_already_exists(self, world: World) -> None:
        """Emails are unique regardless of letter case."""
        world.create()
        with pytest.raises(AlreadyExists) as error:
            world.create(username="other", email="JANE@Example.COM")
        assert error.value.field == "email"

    def test_admin_role_is_permission_denied(self, world: World) -> None:
        """Nobody makes themself admin by registering."""
        with pytest.raises(PermissionDenied):
            world.create(role=Role.ADMIN)
        assert world.users.accounts == {}

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            ({"username": "ab"}, "username"),
            ({"username": "jane doe"}, "username"),
            ({"username": "j" * 33}, "username"),
            ({"first_name": "  "}, "first_name"),
            ({"last_name": "x" * 101}, "last_name"),
            ({"first_name": "Ja\x00ne"}, "first_name"),
            ({"first_name": "Jane\u2028Security notice"}, "first_name"),
            ({"last_name": "Doe\u2029"}, "last_name"),
            ({"email": "Jane <jane@example.com>"}, "email"),
            ({"email": "jane@example.com, eve@example.com"}, "email"),
            ({"email": "not-an-email"}, "email"),
            ({"email": "jane@localhost"}, "email"),
            ({"email": "a" * 250 + "@x.io"}, "email"),
            ({"password": "elevenchars"}, "password"),
            ({"password": "p" * 129}, "password"),
            ({"password": "my name is jane, really"}, "password"),
            ({"password_confirmation": "something else entirely"}, "password_confirmation"),
        ],
    )
    def test_bad_fields_are_named(self, world: World, changes: dict[str, str], field: str) -> None:
        """Each bad field is reported under its proto name, and nothing is stored."""
        with pytest.raises(InvalidArgument) as error:
            world.create(**changes)
        assert field in violated_fields(error)
        assert world.users.accounts == {}

    def test_password_length_counts_code_points(self, world: World) -> None:
        """Twelve emoji are twelve characters: long enough."""
        assert world.create(password="😀" * 12).username == "jane"

    def test_password_of_128_characters_is_accepted(self, world: World) -> None:
        """Long passphrases are welcome, up to 128 characters."""
        assert world.create(password="p" * 128).username == "jane"

    def test_minimum_length_follows_the_policy(self) -> None:
        """Operators can raise the minimum to 15."""
        world = World(AccountPolicy(password=PasswordPolicy(min_length=15)))
        with pytest.raises(InvalidArgument):
            world.create(password="fourteen chars")


class TestActivateUser:
    def test_right_code_activates(self, world: World) -> None:
        """The mailed code activates the account, found by either identifier in any case."""
        user = world.create()
        activated = run(world.service.activate_user("JANE@example.com", world.last_code()))
        assert activated.id == user.id
        assert activated.is_active

    def test_code_works_once(self, world: World) -> None:
        """A used code fails the second time."""
        world.create()
        code = world.last_code()
        run(world.service.activate_user("jane", code))
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", code))

    def test_expired_code_fails(self, world: World) -> None:
        """Past its lifetime the right code is refused."""
        world.create()
        world.clock.advance(minutes=15, seconds=1)
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", world.last_code()))

    def test_wrong_guesses_kill_the_code(self, world: World) -> None:
        """After five wrong codes the right one fails too."""
        world.create()
        code = world.last_code()
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        for _ in range(5):
            with pytest.raises(InvalidActivationCode):
                run(world.service.activate_user("jane", wrong))
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", code))

    def test_unknown_account_looks_like_a_wrong_code(self, world: World) -> None:
        """The answer does not tell whether the account exists."""
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("nobody", "123456"))

    @pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "١٢٣٤٥٦"])
    def test_malformed_code_is_invalid_argument(self, world: World, code: str) -> None:
        """Only six ASCII digits are a code."""
        with pytest.raises(InvalidArgument) as error:
            run(world.service.activate_user("jane", code))
        assert violated_fields(error) == {"code"}


class TestResendActivationCode:
    def test_new_code_replaces_the_old(self, world: World) -> None:
        """After a resend only the newest code works."""
        world.create()
        old = world.last_code()
        run(world.service.resend_activation_code("jane"))
        new = world.last_code()
        if old != new:
            with pytest.raises(InvalidActivationCode):
                run(world.service.activate_user("jane", old))
        assert run(world.service.activate_user("jane", new)).is_active

    def test_sends_are_capped_per_window(self, world: World) -> None:
        """Five mails an hour at most, the registration mail included; the next window allows more."""
        world.create()
        for _ in range(10):
            run(world.service.resend_activation_code("jane"))
        assert len(world.mailer.sent) == 5
        world.clock.advance(hours=1, seconds=1)
        run(world.service.resend_activation_code("jane"))
        assert len(world.mailer.sent) == 6

    def test_unknown_and_active_accounts_get_no_mail(self, world: World) -> None:
        """The call succeeds quietly and sends nothing."""
        world.create()
        run(world.service.activate_user("jane", world.last_code()))
        run(world.service.resend_activation_code("jane"))
        run(world.service.resend_activation_code("nobody@example.com"))
        assert len(world.mailer.sent) == 1


class TestVerifyCredentials:
    def test_right_password_of_active_user(self, world: World) -> None:
        world.create()
        run(world.service.activate_user("jane", world.last_code()))
        assert run(world.service.verify_credentials("Jane", PASSWORD, source="10.0.0.1")).username == "jane"

    def test_unknown_account_and_wrong_password_look_the_same(self, world: World) -> None:
        """Same error and message, and the missing account still costs a hash check."""
        world.create()
        with pytest.raises(InvalidCredentials) as wrong:
            run(world.service.verify_credentials("jane", "wrong password here", source="10.0.0.1"))
        with pytest.raises(InvalidCredentials) as unknown:
            run(world.service.verify_credentials("nobody", "wrong password here", source="10.0.0.1"))
        assert str(wrong.value) == str(unknown.value)
        assert world.hasher.verified_against_missing == 1

    def test_inactive_account_is_told_only_after_the_right_password(self, world: World) -> None:
        world.create()
        with pytest.raises(InvalidCredentials):
            run(world.service.verify_credentials("jane", "wrong password here", source="10.0.0.1"))
        with pytest.raises(AccountNotActive):
            run(world.service.verify_credentials("jane", PASSWORD, source="10.0.0.1"))


class TestLookupAndDelete:
    def test_get_by_identifier_finds_only_active_users(self, world: World) -> None:
        world.create()
        with pytest.raises(NotFound):
            run(world.service.get_active_user_by_identifier("jane"))
        run(world.service.activate_user("jane", world.last_code()))
        assert run(world.service.get_active_user_by_identifier("JANE@EXAMPLE.COM")).username == "jane"

    def test_delete_then_get_is_not_found(self, world: World) -> None:
        user = world.create()
        run(world.service.delete_user(user.id, password="", caller=ADMIN))
        with pytest.raises(NotFound):
            run(world.service.get_user(user.id))
        with pytest.raises(NotFound):
            run(world.service.delete_user(user.id, password="", caller=ADMIN))

    def test_deleting_ones_own_account_takes_the_password(self, world: World) -> None:
        """A token alone is not enough; a wrong password counts toward the throttle."""
        user = world.create()
        itself = Caller(user_id=user.id, role=Role.USER)
        with pytest.raises(InvalidArgument) as missing:
            run(world.service.delete_user(user.id, password="", caller=itself))
        assert violated_fields(missing) == {"password"}
        with pytest.raises(InvalidCredentials):
            run(world.service.delete_user(user.id, password="not the password", caller=itself))
        counted = [tally.count for _, kind, tally in world.throttles.tallies.values() if kind == "password"]
        assert counted, "the wrong password was not counted"
        assert set(counted) == {1}
        assert run(world.service.get_user(user.id)).id == user.id
        run(world.service.delete_user(user.id, password=PASSWORD, caller=itself))
        with pytest.raises(NotFound):
            run(world.service.get_user(user.id))

    def test_an_admin_deleting_themself_takes_the_password_too(self, world: World) -> None:
        run(world.service.create_admin(registration(username="other", email="other@example.com")))
        admin = run(world.service.create_admin(registration()))  # not the last admin: it may go
        itself = Caller(user_id=admin.id, role=Role.ADMIN)
        with pytest.raises(InvalidArgument):
            run(world.service.delete_user(admin.id, password="", caller=itself))
        run(world.service.delete_user(admin.id, password=PASSWORD, caller=itself))
        with pytest.raises(NotFound):
            run(world.service.get_user(admin.id))

    def test_only_an_admin_deletes_someone_else(self, world: World) -> None:
        user = world.create()
        with pytest.raises(PermissionDenied):
            run(world.service.delete_user(user.id, password=PASSWORD, caller=Caller(user_id="f" * 24)))

    @pytest.mark.parametrize("user_id", ["", "xyz", "6B07D8AEEE680BE65577D511", "6b07d8aeee680be65577d51"])
    def test_bad_id_is_invalid_argument(self, world: World, user_id: str) -> None:
        with pytest.raises(InvalidArgument) as error:
            run(world.service.get_user(user_id))
        assert violated_fields(error) == {"id"}


def test_activation_code_ttl_is_in_the_mail() -> None:
    """The mail tells the user how long the code lasts."""
    world = World(AccountPolicy(activation_code_ttl=timedelta(minutes=30)))
    world.create()
    assert "30 minutes" in world.mailer.sent[0].body


class TestPasswordThrottling:
    """Rising delays per account and source; an account-wide count for sources the owner never used."""

    @staticmethod
    def active_world(**policy: Any) -> World:
        world = World(throttle=ThrottlePolicy(**policy))
        world.create()
        run(world.service.activate_user("jane", world.last_code()))
        return world

    @staticmethod
    def wrong(world: World, source: str) -> None:
        with pytest.raises(InvalidCredentials):
            run(world.service.verify_credentials("jane", "wrong password here", source=source))

    def right(self, world: World, source: str) -> str:
        return run(world.service.verify_credentials("jane", PASSWORD, source=source)).username

    def test_past_the_free_tries_a_source_waits_a_doubling_delay(self) -> None:
        world = self.active_world(free_attempts=3, first_delay=timedelta(seconds=1))
        for _ in range(3):
            self.wrong(world, "10.0.0.1")
        with pytest.raises(TooManyAttempts) as throttled:
            self.right(world, "10.0.0.1")  # even the right password waits
        assert throttled.value.retry_after == timedelta(seconds=1)
        world.clock.advance(seconds=1)
        self.wrong(world, "10.0.0.1")  # the fourth failure: now two seconds
        world.clock.advance(seconds=1)
        with pytest.raises(TooManyAttempts) as throttled:
            self.right(world, "10.0.0.1")
        assert throttled.value.retry_after == timedelta(seconds=1)
        world.clock.advance(seconds=1)
        assert self.right(world, "10.0.0.1") == "jane"

    def test_a_guesser_does_not_hold_the_owner_at_another_address(self) -> None:
        world = self.active_world(free_attempts=3)
        for _ in range(3):
            self.wrong(world, "10.0.0.66")
        assert self.right(world, "10.0.0.1") == "jane"

    def test_many_addresses_are_slowed_account_wide_but_not_the_owners_known_address(self) -> None:
        world = self.active_world(free_attempts=5, account_free_attempts=4)
        assert self.right(world, "10.0.0.1") == "jane"  # the owner's usual address
        for n in range(4):
            self.wrong(world, f"10.9.0.{n}")
        with pytest.raises(TooManyAttempts):
            self.right(world, "10.9.0.200")  # a fifth new address waits
        assert self.right(world, "10.0.0.1") == "jane"  # the owner's does not

    def test_failures_are_forgotten_after_the_window_and_on_success(self) -> None:
        world = self.active_world(free_attempts=2, window=timedelta(minutes=15))
        for _ in range(2):
            self.wrong(world, "10.0.0.1")
        world.clock.advance(minutes=15, seconds=1)
        self.wrong(world, "10.0.0.1")
        assert self.right(world, "10.0.0.1") == "jane"
        for _ in range(2):  # the success set the count back to zero
            self.wrong(world, "10.0.0.1")

    def test_a_completed_reset_forgets_every_failure(self) -> None:
        world = self.active_world(free_attempts=2)
        for _ in range(2):
            self.wrong(world, "10.0.0.1")
        user_id = next(iter(world.users.accounts))
        run(world.service.owner_proved_mailbox(user_id, "10.0.0.1"))
        assert self.right(world, "10.0.0.1") == "jane"

    def test_unknown_accounts_are_throttled_alike(self) -> None:
        world = self.active_world(free_attempts=2)
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                run(world.service.verify_credentials("nobody", "wrong password here", source="10.0.0.1"))
        with pytest.raises(TooManyAttempts):
            run(world.service.verify_credentials("nobody", "wrong password here", source="10.0.0.1"))


def test_common_passwords_are_refused_with_the_reason() -> None:
    """The zxcvbn list the composition root loads refuses `password1234`; a plain passphrase passes."""
    world = World(AccountPolicy(password=PasswordPolicy(common_passwords=common_passwords(12))))
    with pytest.raises(InvalidArgument) as error:
        world.create(password="Password1234")
    assert "common" in error.value.violations[0].description
    assert world.create(password="walnut harbour violin").username == "jane"


def test_wrong_codes_do_not_use_up_the_token(world: World) -> None:
    world.create()
    token, code = world.last_token(), world.last_code()
    for wrong in codes_other_than(code, count=6):
        with pytest.raises(InvalidActivationCode):
            run(world.service.activate_user("jane", wrong))
    with pytest.raises(InvalidActivationCode):
        run(world.service.activate_user("jane", "", token="not the token"))
    assert run(world.service.activate_user("jane", "", token=token)).is_active
    with pytest.raises(InvalidActivationCode):
        run(world.service.activate_user("jane", "", token=token))
