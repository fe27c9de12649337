"""Password reset and change on fakes: single-use, expiring, capped tokens, and changes that end every session."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta

import pytest

from tests.support.fakes import FakeCredentialRepository, FakeSessionRepository
from tests.support.logs import logged
from tests.support.world import PASSWORD, World, run
from users_grpc.domain.errors import InvalidArgument, InvalidCredentials, InvalidResetToken, TooManyAttempts
from users_grpc.domain.model import User, UserState
from users_grpc.domain.rules import PasswordPolicy
from users_grpc.services.accounts import AccountPolicy
from users_grpc.services.notices import security_notice
from users_grpc.services.passwords import PasswordService
from users_grpc.services.throttling import ThrottlePolicy

NEW = "a brand new passphrase"
SOURCE = "10.0.0.1"
TTL = timedelta(minutes=30)


class Recovery(World):
    def __init__(self) -> None:
        self.credentials = FakeCredentialRepository()
        super().__init__(
            AccountPolicy(reply_floor=timedelta(0)), ThrottlePolicy(free_attempts=3), users=self.credentials
        )
        self.sessions = FakeSessionRepository()
        self.passwords = PasswordService(
            accounts=self.service,
            credentials=self.credentials,
            sessions=self.sessions,
            mailer=self.mailer,
            hasher=self.hasher,
            digests=self.digests,
            clock=self.clock,
            password_policy=PasswordPolicy(),
            reset_token_ttl=TTL,
            reset_max_sends=3,
            reset_send_window=timedelta(hours=1),
            reply_floor=timedelta(0),
        )
        self.user = self.create()
        run(self.service.activate_user("jane", self.last_code()))
        self.mailer.sent.clear()

    def forgot(self, identifier: str = "jane") -> None:
        run(self.passwords.forgot_password(identifier))

    def reset_token(self) -> str:
        match = re.search(r"password:\n\n(\S+)\n\n", self.mailer.sent[-1].body)
        assert match, self.mailer.sent[-1].body
        return match.group(1)

    def reset(self, token: str, password: str = NEW, confirmation: str | None = None) -> None:
        confirmation = password if confirmation is None else confirmation
        run(self.passwords.reset_password(token, password, confirmation, source=SOURCE))

    def password_hash(self) -> str:
        return self.credentials.accounts[self.user.id].password_hash

    def current(self) -> User:
        return self.credentials.accounts[self.user.id].user

    def open_session(self) -> str:
        session_id = self.sessions.new_id()
        now = self.clock.now()
        run(self.sessions.create(session_id, self.user.id, "digest", now, now + timedelta(days=1), 0))
        return session_id

    def all_signed_out(self, session_ids: list[str]) -> bool:
        return all(self.sessions.records[s].revoked_at == self.clock.now() for s in session_ids)


@pytest.fixture
def world() -> Recovery:
    return Recovery()


def fields(error: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {violation.field for violation in error.value.violations}


class TestForgotPassword:
    def test_the_mail_carries_a_token_that_names_the_user(self, world: Recovery) -> None:
        world.forgot("JANE@example.com")
        (mail,) = world.mailer.sent
        assert (mail.to, mail.subject) == ("jane@example.com", "Reset your password")
        token = world.reset_token()
        assert mail.body == (
            "Hello jane,\n\n"
            f"use this token to set a new password:\n\n{token}\n\n"
            "It works once and expires in 30 minutes.\n"
            "If you did not ask for this, ignore this email: your password is unchanged.\n"
        )
        user_id, secret = token.split(".")
        assert user_id == world.user.id
        assert len(secret) == 43  # 32 random bytes

    def test_the_database_keeps_only_a_keyed_digest(self, world: Recovery) -> None:
        world.forgot()
        secret = world.reset_token().split(".")[1]
        pending = world.credentials.accounts[world.user.id].password_reset
        assert pending is not None
        assert pending.digest == world.digests.digest("password-reset", world.user.id, secret)
        assert pending.expires_at == world.clock.now() + TTL
        assert pending.attempts_left == 1

    def test_unknown_and_inactive_accounts_get_nothing(self, world: Recovery) -> None:
        world.forgot("nobody")
        account = world.credentials.accounts[world.user.id]
        world.credentials.accounts[world.user.id] = dataclasses.replace(
            account, user=dataclasses.replace(account.user, state=UserState.DEACTIVATED)
        )
        world.forgot()
        assert world.mailer.sent == []
        assert world.credentials.accounts[world.user.id].password_reset is None

    def test_a_bad_identifier_is_invalid_argument(self, world: Recovery) -> None:
        with pytest.raises(InvalidArgument):
            world.forgot("")

    def test_sends_are_capped_per_window(self, world: Recovery, log: pytest.LogCaptureFixture) -> None:
        for _ in range(4):
            world.forgot()
        assert len(world.mailer.sent) == 3
        logged(log, "password reset capped", user_id=world.user.id)
        sent = [getattr(r, "user_id", None) for r in log.records if r.getMessage() == "password reset sent"]
        assert sent == [world.user.id] * 3
        world.forgot()
        world.clock.advance(minutes=59)
        world.forgot()
        assert len(world.mailer.sent) == 3
        world.clock.advance(minutes=1, seconds=1)
        world.forgot()
        assert len(world.mailer.sent) == 4

    def test_a_new_token_replaces_the_old(self, world: Recovery) -> None:
        world.forgot()
        old = world.reset_token()
        world.forgot()
        with pytest.raises(InvalidResetToken):
            world.reset(old)
        world.reset(world.reset_token())


class TestResetPassword:
    def test_a_reset_token_sets_the_password_and_ends_everything(
        self, world: Recovery, log: pytest.LogCaptureFixture
    ) -> None:
        sessions = [world.open_session(), world.open_session()]
        world.forgot()
        world.clock.advance(minutes=5)
        world.reset(world.reset_token())
        assert world.password_hash() == f"hashed:{NEW}"
        assert world.current().token_version == 1
        assert world.all_signed_out(sessions)
        assert world.mailer.woken == 1
        (notice,) = world.credentials.notices
        assert notice == security_notice(world.service.mail_renderer, world.user, "password-reset")
        logged(log, "password set", user_id=world.user.id)
        logged(log, "password failures forgotten", user_id=world.user.id, source=SOURCE)

    def test_a_reset_token_is_single_use(self, world: Recovery) -> None:
        world.forgot()
        token = world.reset_token()
        world.reset(token)
        with pytest.raises(InvalidResetToken):
            world.reset(token, "yet another passphrase")
        assert world.password_hash() == f"hashed:{NEW}"

    def test_a_reset_token_expires(self, world: Recovery) -> None:
        world.forgot()
        world.clock.advance(minutes=30)
        with pytest.raises(InvalidResetToken):
            world.reset(world.reset_token())
        assert world.password_hash() == f"hashed:{PASSWORD}"

    def test_a_reset_token_works_until_it_expires(self, world: Recovery) -> None:
        world.forgot()
        world.clock.advance(minutes=29, seconds=59)
        world.reset(world.reset_token())
        assert world.password_hash() == f"hashed:{NEW}"

    def test_a_completed_reset_forgets_the_failed_tries(self, world: Recovery) -> None:
        for _ in range(3):
            with pytest.raises(InvalidCredentials):
                run(world.service.verify_credentials("jane", "wrong password here", source="10.9.9.9"))
        world.forgot()
        world.reset(world.reset_token())
        assert run(world.service.verify_credentials("jane", NEW, source="10.9.9.9")).id == world.user.id

    @pytest.mark.parametrize(
        "spelling",
        [
            "",
            "{uid}",
            "{uid}.",
            "{uid}{secret}",
            "{other}.{secret}",  # bound to its user
            "{UID}.{secret}",  # an id of no one
            "{uid}.{secret}x",
            "{uid}.x{secret}",
            "{uid}.{secret}" + "x" * 100,
        ],
    )
    def test_a_wrong_token_is_refused_and_the_right_one_still_works(self, world: Recovery, spelling: str) -> None:
        other = world.create(username="other", email="other@example.com")
        world.forgot()
        user_id, secret = world.reset_token().split(".")
        with pytest.raises(InvalidResetToken):
            world.reset(spelling.format(uid=user_id, UID=user_id[:-1] + "f", other=other.id, secret=secret))
        world.reset(f"{user_id}.{secret}")

    @pytest.mark.parametrize(
        ("password", "confirmation", "field"),
        [
            ("short", "short", "new_password"),
            ("jane is my name forever", "jane is my name forever", "new_password"),  # the username
            (NEW, NEW + "!", "new_password_confirmation"),
        ],
    )
    def test_a_bad_new_password_is_named_and_leaves_the_token(
        self, world: Recovery, password: str, confirmation: str, field: str
    ) -> None:
        world.forgot()
        token = world.reset_token()
        with pytest.raises(InvalidArgument) as error:
            world.reset(token, password, confirmation)
        assert not isinstance(error.value, InvalidResetToken)
        assert fields(error) == {field}
        world.reset(token)

    def test_the_emails_local_part_may_not_be_in_the_password(self, world: Recovery) -> None:
        world.create(username="other", email="walrus@example.com")
        account = world.credentials.accounts
        other = next(a.user for a in account.values() if a.user.username == "other")
        run(world.service.activate_user("other", world.last_code()))
        world.forgot("other")
        with pytest.raises(InvalidArgument) as error:
            run(
                world.passwords.reset_password(world.reset_token(), "the walrus said", "the walrus said", source=SOURCE)
            )
        assert fields(error) == {"new_password"}
        assert other.email.startswith("walrus@")


class TestChangePassword:
    def change(self, world: Recovery, current: str, new: str = NEW, confirmation: str | None = None) -> None:
        run(
            world.passwords.change_password(
                world.user.id, current, new, new if confirmation is None else confirmation, source=SOURCE
            )
        )

    def test_a_change_sets_the_password_and_ends_everything(self, world: Recovery) -> None:
        sessions = [world.open_session()]
        world.forgot()
        pending_reset = world.reset_token()
        world.clock.advance(minutes=1)
        self.change(world, PASSWORD)
        assert world.password_hash() == f"hashed:{NEW}"
        assert world.current().token_version == 1
        assert world.current().updated_at == world.clock.now()
        assert world.all_signed_out(sessions)
        assert world.mailer.woken == 1
        assert world.credentials.notices == [
            security_notice(world.service.mail_renderer, world.user, "password-changed")
        ]
        with pytest.raises(InvalidResetToken):  # a pending reset dies with the old password
            world.reset(pending_reset)

    def test_the_current_password_is_required(self, world: Recovery) -> None:
        with pytest.raises(InvalidArgument) as error:
            self.change(world, "")
        assert [(v.field, v.description) for v in error.value.violations] == [("current_password", "is required")]

    def test_a_wrong_current_password_is_refused_and_counted(self, world: Recovery) -> None:
        with pytest.raises(InvalidCredentials, match=r"^the current password is wrong$"):
            self.change(world, "not the password")
        assert world.password_hash() == f"hashed:{PASSWORD}"
        assert world.credentials.notices == []
        counted = [tally.count for _, kind, tally in world.throttles.tallies.values() if kind == "password"]
        assert counted
        assert set(counted) == {1}

    def test_wrong_current_passwords_from_one_address_do_not_hold_the_owner_at_another(self, world: Recovery) -> None:
        for _ in range(3):
            with pytest.raises(InvalidCredentials):
                run(world.passwords.change_password(world.user.id, "not it", NEW, NEW, source="10.6.6.6"))
        with pytest.raises(TooManyAttempts):
            run(world.passwords.change_password(world.user.id, PASSWORD, NEW, NEW, source="10.6.6.6"))
        self.change(world, PASSWORD)
        assert world.password_hash() == f"hashed:{NEW}"

    def test_a_bad_new_password_is_refused_before_the_current_is_tried(self, world: Recovery) -> None:
        with pytest.raises(InvalidArgument) as error:
            self.change(world, "not the password", "short")
        assert fields(error) == {"new_password"}
        with pytest.raises(InvalidArgument) as error:
            self.change(world, PASSWORD, NEW, "something else")
        assert [(v.field, v.description) for v in error.value.violations] == [
            ("new_password_confirmation", "must equal new_password")
        ]
        assert world.throttles.tallies == {} or all(
            kind != "password" for _, kind, _ in world.throttles.tallies.values()
        )
        assert world.password_hash() == f"hashed:{PASSWORD}"

    def test_an_unknown_user_is_invalid_credentials(self, world: Recovery) -> None:
        with pytest.raises(InvalidCredentials):
            run(world.passwords.change_password("f" * 24, PASSWORD, NEW, NEW, source=SOURCE))
        with pytest.raises(InvalidArgument) as error:
            run(world.passwords.change_password("nope", PASSWORD, NEW, NEW, source=SOURCE))
        assert fields(error) == {"user_id"}


def test_a_security_notice_greets_by_username_and_says_what_changed(world: Recovery) -> None:
    user = dataclasses.replace(world.user, first_name="<a href=x>click</a>")
    notice = security_notice(world.service.mail_renderer, user, "password-reset")
    assert (notice.to, notice.subject) == ("jane@example.com", "Your password was reset")
    assert notice.body == (
        "Hello jane,\n\nyour password was reset, and every session of your account was signed out.\n"
        "If this was not you, reset your password now and contact support.\n"
    )
