"""Two-factor sign-in on fakes: enrollment, codes that work once, recovery codes, throttling, turning it off."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import os
import re
from datetime import datetime, timedelta

import pyotp
import pytest
import qrcode
import qrcode.image.pure

from tests.support.codes import codes_other_than
from tests.support.fakes import FakeCredentialRepository, FakeSessionRepository
from tests.support.logs import logged
from tests.support.world import PASSWORD, World, run
from users_grpc.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvalidCredentials,
    InvalidSecondFactor,
    MfaRequired,
    NotFound,
    TooManyAttempts,
)
from users_grpc.domain.model import User
from users_grpc.services.accounts import AccountPolicy
from users_grpc.services.mfa import STEP_SECONDS, Enrollment, MfaService, totp, totp_context
from users_grpc.services.notices import security_notice
from users_grpc.services.throttling import ThrottlePolicy
from users_grpc.services.tokens import KeyEncryption

SOURCE = "10.0.0.1"
ISSUER = "Example Users"


class Mfa(World):
    def __init__(self) -> None:
        self.credentials = FakeCredentialRepository()
        super().__init__(
            AccountPolicy(reply_floor=timedelta(0)), ThrottlePolicy(free_attempts=2), users=self.credentials
        )
        self.sessions = FakeSessionRepository()
        self.encryption = KeyEncryption(os.urandom(32))
        self.mfa = MfaService(
            accounts=self.service,
            credentials=self.credentials,
            sessions=self.sessions,
            mailer=self.mailer,
            encryption=self.encryption,
            digests=self.digests,
            clock=self.clock,
            issuer=ISSUER,
            max_attempts=3,
            attempt_window=timedelta(minutes=5),
        )
        self.user = self.create()
        run(self.service.activate_user("jane", self.last_code()))
        self.clock.advance(seconds=7)  # off a step boundary

    @property
    def step(self) -> int:
        return int(self.clock.now().timestamp()) // STEP_SECONDS

    def enable(self) -> Enrollment:
        return run(self.mfa.enable(self.user.id, PASSWORD, source=SOURCE))

    def turned_on(self) -> tuple[str, list[str]]:
        """MFA on: the secret and the recovery codes; the clock moved to the next step."""
        secret = self.enable().secret
        codes = run(self.mfa.confirm(self.user.id, totp(secret, self.step)))
        self.clock.advance(seconds=STEP_SECONDS)
        return secret, codes

    def login(self, totp_code: str = "", recovery_code: str = "", password: str = PASSWORD) -> User:
        return run(self.mfa.verify_login("jane", password, totp_code, recovery_code, source=SOURCE))

    def current(self) -> User:
        return self.credentials.accounts[self.user.id].user

    def open_session(self) -> str:
        session_id = self.sessions.new_id()
        now = self.clock.now()
        run(self.sessions.create(session_id, self.user.id, "digest", now, now + timedelta(days=1), 0))
        return session_id

    def signed_out(self, session_id: str) -> bool:
        return self.sessions.records[session_id].revoked_at == self.clock.now()


@pytest.fixture
def world() -> Mfa:
    return Mfa()


def fields(error: pytest.ExceptionInfo[InvalidArgument]) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in error.value.violations]


class TestEnrollment:
    def test_enable_takes_the_password_and_shows_the_secret_once(
        self, world: Mfa, log: pytest.LogCaptureFixture
    ) -> None:
        enrollment = world.enable()
        logged(log, "mfa enrollment started", user_id=world.user.id)
        assert world.current().updated_at == world.clock.now()
        png = io.BytesIO()
        qrcode.make(enrollment.otpauth_uri, image_factory=qrcode.image.pure.PyPNGImage).save(png)
        assert enrollment.qr_code_png == png.getvalue()
        assert len(base64.b32decode(enrollment.secret)) == 20  # 160 bits
        assert enrollment.otpauth_uri == pyotp.TOTP(enrollment.secret).provisioning_uri(
            name="jane@example.com", issuer_name=ISSUER
        )
        assert enrollment.qr_code_png.startswith(b"\x89PNG")
        mfa = world.credentials.accounts[world.user.id].mfa
        assert mfa is not None
        assert not mfa.active
        assert enrollment.secret.encode() not in mfa.sealed_secret
        assert world.encryption.open(mfa.sealed_secret, f"totp:{world.user.id}") == enrollment.secret.encode()
        assert totp_context(world.user.id) == f"totp:{world.user.id}"
        assert run(world.mfa.qr_code(world.user.id)) == enrollment
        assert not world.current().mfa_enabled

    def test_enable_without_the_right_password_is_refused_and_counted(self, world: Mfa) -> None:
        with pytest.raises(InvalidCredentials):
            run(world.mfa.enable(world.user.id, "not the password", source=SOURCE))
        assert world.credentials.accounts[world.user.id].mfa is None
        assert any(kind == "password" for _, kind, _ in world.throttles.tallies.values())
        with pytest.raises(InvalidArgument):
            run(world.mfa.enable(world.user.id, "", source=SOURCE))
        with pytest.raises(InvalidArgument) as error:
            run(world.mfa.enable("nope", PASSWORD, source=SOURCE))
        assert fields(error)[0][0] == "user_id"
        for call in (
            world.mfa.qr_code("nope"),
            world.mfa.reset("nope"),
            world.mfa.disable("nope", PASSWORD, "123456", source=SOURCE),
        ):
            with pytest.raises(InvalidArgument) as error:
                run(call)
            assert fields(error)[0][0] == "user_id"
        with pytest.raises(InvalidCredentials):
            run(world.mfa.enable("f" * 24, PASSWORD, source=SOURCE))

    def test_a_new_enable_replaces_the_pending_enrollment(self, world: Mfa) -> None:
        old = world.enable().secret
        new = world.enable().secret
        assert old != new
        stale = totp(old, world.step)
        if stale not in {totp(new, world.step), totp(new, world.step - 1)}:  # the same code once in 500,000
            with pytest.raises(InvalidSecondFactor):
                run(world.mfa.confirm(world.user.id, stale))
        run(world.mfa.confirm(world.user.id, totp(new, world.step)))

    def test_confirming_turns_mfa_on_ends_every_session_and_mails_a_notice(
        self, world: Mfa, log: pytest.LogCaptureFixture
    ) -> None:
        session = world.open_session()
        secret = world.enable().secret
        world.clock.advance(seconds=1)
        codes = run(world.mfa.confirm(world.user.id, totp(secret, world.step)))
        assert world.current().updated_at == world.clock.now()
        logged(log, "mfa changed", user_id=world.user.id, change="on")
        assert len(codes) == 10
        assert len(set(codes)) == 10
        assert all(re.fullmatch(r"[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}", code) for code in codes)
        assert world.current().mfa_enabled
        assert world.current().token_version == 1
        assert world.signed_out(session)
        assert world.mailer.woken == 1
        assert world.credentials.notices == [security_notice(world.service.mail_renderer, world.user, "mfa-enabled")]
        with pytest.raises(FailedPrecondition, match=r"^MFA is already on$"):
            world.enable()
        with pytest.raises(FailedPrecondition, match=r"^no pending MFA enrollment: call EnableMfa$"):
            run(world.mfa.qr_code(world.user.id))

    def test_confirm_takes_the_current_or_the_previous_steps_code_only(self, world: Mfa) -> None:
        secret = world.enable().secret
        accepted = {totp(secret, world.step), totp(secret, world.step - 1)}
        for step in (world.step + 1, world.step - 2):
            if totp(secret, step) not in accepted:  # another step's code is the same once in 500,000
                with pytest.raises(InvalidSecondFactor):
                    run(world.mfa.confirm(world.user.id, totp(secret, step)))
        run(world.mfa.confirm(world.user.id, totp(secret, world.step - 1)))
        assert world.current().mfa_enabled

    @pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "١٢٣٤٥٦", "aaaa-bbbb-cccc"])
    def test_confirm_wants_six_digits(self, world: Mfa, code: str) -> None:
        world.enable()
        with pytest.raises(InvalidArgument) as error:
            run(world.mfa.confirm(world.user.id, code))
        assert fields(error) == [("code", "must be the 6-digit code of the authenticator app")]
        assert world.credentials.mfa_failures[world.user.id] == (0, None)  # no attempt spent

    def test_confirm_without_a_pending_enrollment_is_a_failed_precondition(self, world: Mfa) -> None:
        with pytest.raises(FailedPrecondition, match=r"^no pending MFA enrollment: call EnableMfa$"):
            run(world.mfa.confirm(world.user.id, "123456"))
        with pytest.raises(InvalidArgument):
            run(world.mfa.qr_code("nope"))

    def test_confirm_guesses_are_capped_per_window(self, world: Mfa) -> None:
        secret = world.enable().secret
        right = totp(secret, world.step)
        [wrong] = codes_other_than(right, totp(secret, world.step - 1))
        for _ in range(3):
            with pytest.raises(InvalidSecondFactor):
                run(world.mfa.confirm(world.user.id, wrong))
        with pytest.raises(TooManyAttempts):
            run(world.mfa.confirm(world.user.id, right))
        world.clock.advance(minutes=5, seconds=1)
        run(world.mfa.confirm(world.user.id, totp(secret, world.step)))


class TestSignIn:
    def test_without_mfa_the_password_is_enough(self, world: Mfa) -> None:
        assert world.login().id == world.user.id

    def test_with_mfa_a_code_is_required_but_told_only_after_the_right_password(self, world: Mfa) -> None:
        world.turned_on()
        with pytest.raises(InvalidCredentials):
            world.login(password="not the password")
        with pytest.raises(MfaRequired):
            world.login()

    def test_a_totp_code_works_once(self, world: Mfa) -> None:
        secret, _ = world.turned_on()
        code = totp(secret, world.step)
        assert world.login(totp_code=code).id == world.user.id
        with pytest.raises(InvalidSecondFactor):
            world.login(totp_code=code)
        with pytest.raises(InvalidSecondFactor):  # nor an older step's, once a newer one was used
            world.login(totp_code=totp(secret, world.step - 1))
        world.clock.advance(seconds=STEP_SECONDS)
        assert world.login(totp_code=totp(secret, world.step)).id == world.user.id

    def test_a_wrong_totp_code_is_refused(self, world: Mfa) -> None:
        secret, _ = world.turned_on()
        right = totp(secret, world.step)
        with pytest.raises(InvalidSecondFactor):
            world.login(totp_code=f"{(int(right) + 1) % 1_000_000:06d}")

    def test_a_recovery_code_works_once_in_any_spelling(self, world: Mfa) -> None:
        _, codes = world.turned_on()
        assert world.login(recovery_code=codes[0]).id == world.user.id
        with pytest.raises(InvalidSecondFactor):
            world.login(recovery_code=codes[0])
        assert world.login(recovery_code=codes[1].upper().replace("-", "")).id == world.user.id
        assert world.login(recovery_code=" " + codes[2].replace("-", " ") + " ").id == world.user.id
        with pytest.raises(InvalidSecondFactor):
            world.login(recovery_code="aaaa-bbbb-cccc")
        mfa = world.credentials.accounts[world.user.id].mfa
        assert mfa is not None
        assert len(mfa.recovery_digests) == 7
        assert not any(code.replace("-", "") in "".join(mfa.recovery_digests) for code in codes)

    def test_a_recovery_code_stored_under_the_old_unkeyed_digest_works_once(
        self, world: Mfa, log: pytest.LogCaptureFixture
    ) -> None:
        world.turned_on()
        legacy = hashlib.sha256(b"recovery\0abcdefghjkmn").hexdigest()
        run(world.credentials.replace_recovery_codes(world.user.id, [legacy]))
        assert world.login(recovery_code="ABCD-EFGH-JKMN").id == world.user.id
        logged(log, "legacy recovery code used", user_id=world.user.id)
        with pytest.raises(InvalidSecondFactor):
            world.login(recovery_code="abcd-efgh-jkmn")

    @pytest.mark.parametrize(
        ("totp_code", "recovery_code", "field", "description"),
        [
            ("aaaa-bbbb-cccc", "", "totp_code", "must be the 6-digit code of the authenticator app"),
            ("12345", "", "totp_code", "must be the 6-digit code of the authenticator app"),
            ("", "123456", "recovery_code", "must be a recovery code (letters and digits, dashes optional)"),
            ("", "aaaa-bbbb-ccc", "recovery_code", "must be a recovery code (letters and digits, dashes optional)"),
            ("", "aaaa-bbbb-ccccc", "recovery_code", "must be a recovery code (letters and digits, dashes optional)"),
            ("", "aaaa_bbbb_cccc", "recovery_code", "must be a recovery code (letters and digits, dashes optional)"),
            ("", "a" * 12 + "-" * 21, "recovery_code", "must be a recovery code (letters and digits, dashes optional)"),
        ],
    )
    def test_a_malformed_code_is_pointed_out_without_spending_an_attempt(
        self, world: Mfa, totp_code: str, recovery_code: str, field: str, description: str
    ) -> None:
        world.turned_on()
        before = world.credentials.mfa_failures[world.user.id]
        with pytest.raises(InvalidArgument) as error:
            world.login(totp_code=totp_code, recovery_code=recovery_code)
        assert fields(error) == [(field, description)]
        assert world.credentials.mfa_failures[world.user.id] == before

    def test_a_recovery_code_of_up_to_32_characters_is_read(self, world: Mfa) -> None:
        _, codes = world.turned_on()
        spaced = codes[0].replace("-", "") + "-" * 20
        assert len(spaced) == 32
        assert world.login(recovery_code=spaced).id == world.user.id

    def test_guesses_are_capped_even_for_the_right_code(self, world: Mfa, log: pytest.LogCaptureFixture) -> None:
        secret, codes = world.turned_on()
        for _ in range(3):
            with pytest.raises(InvalidSecondFactor):
                world.login(recovery_code="aaaa-bbbb-cccc")
        refusals = [r for r in log.records if r.getMessage() == "second factor refused"]
        assert [r.__dict__.get("user_id") for r in refusals] == [world.user.id] * 3
        with pytest.raises(TooManyAttempts):
            world.login(totp_code=totp(secret, world.step))
        logged(log, "second factor throttled", user_id=world.user.id)
        with pytest.raises(TooManyAttempts):
            world.login(recovery_code=codes[0])
        world.clock.advance(minutes=5, seconds=1)
        assert world.login(recovery_code=codes[0]).id == world.user.id

    def test_a_success_starts_the_count_again(self, world: Mfa) -> None:
        _, codes = world.turned_on()
        for _ in range(2):
            with pytest.raises(InvalidSecondFactor):
                world.login(recovery_code="aaaa-bbbb-cccc")
        world.login(recovery_code=codes[0])
        for _ in range(3):
            with pytest.raises(InvalidSecondFactor):
                world.login(recovery_code="aaaa-bbbb-cccc")


class TestPasswordThrottle:
    """The password checks of sign-in, EnableMfa and DisableMfa count per address, as everywhere."""

    def test_guesses_from_one_address_do_not_hold_the_owner_at_another(self, world: Mfa) -> None:
        secret, codes = world.turned_on()
        for guess in (
            lambda: run(world.mfa.verify_login("jane", "not it", "", codes[0], source="10.6.6.6")),
            lambda: run(world.mfa.disable(world.user.id, "not it", codes[0], source="10.6.6.6")),
        ):
            with pytest.raises(InvalidCredentials):
                guess()
        with pytest.raises(TooManyAttempts):
            run(world.mfa.verify_login("jane", PASSWORD, "", codes[0], source="10.6.6.6"))
        assert run(world.mfa.verify_login("jane", PASSWORD, "", codes[0], source=SOURCE)).id == world.user.id
        run(world.mfa.disable(world.user.id, PASSWORD, codes[1], source=SOURCE))
        with pytest.raises(TooManyAttempts):
            run(world.mfa.enable(world.user.id, PASSWORD, source="10.6.6.6"))
        assert run(world.mfa.enable(world.user.id, PASSWORD, source=SOURCE)).secret != secret


class TestTurningOff:
    def test_disable_takes_password_and_code_and_ends_everything(
        self, world: Mfa, log: pytest.LogCaptureFixture
    ) -> None:
        secret, _ = world.turned_on()
        session = world.open_session()
        world.credentials.notices.clear()
        log.clear()
        world.clock.advance(seconds=1)
        run(world.mfa.disable(world.user.id, PASSWORD, totp(secret, world.step), source=SOURCE))
        assert world.current().updated_at == world.clock.now()
        logged(log, "mfa changed", user_id=world.user.id, change="off")
        assert not world.current().mfa_enabled
        assert world.credentials.accounts[world.user.id].mfa is None
        assert world.current().token_version == 2
        assert world.signed_out(session)
        assert world.credentials.notices == [security_notice(world.service.mail_renderer, world.user, "mfa-disabled")]
        assert world.login().id == world.user.id
        with pytest.raises(FailedPrecondition, match=r"^MFA is off$"):
            run(world.mfa.disable(world.user.id, PASSWORD, totp(secret, world.step + 1), source=SOURCE))

    def test_disable_refuses_a_wrong_password_or_code(self, world: Mfa) -> None:
        _, codes = world.turned_on()
        with pytest.raises(InvalidArgument) as error:
            run(world.mfa.disable(world.user.id, "", codes[0], source=SOURCE))
        assert fields(error) == [("password", "is required")]
        with pytest.raises(InvalidArgument) as error:
            run(world.mfa.disable(world.user.id, PASSWORD, "", source=SOURCE))
        assert fields(error) == [("code", "is required")]
        with pytest.raises(InvalidCredentials):
            run(world.mfa.disable(world.user.id, "not the password", codes[0], source=SOURCE))
        with pytest.raises(InvalidSecondFactor):
            run(world.mfa.disable(world.user.id, PASSWORD, "aaaa-bbbb-cccc", source=SOURCE))
        assert world.current().mfa_enabled
        run(world.mfa.disable(world.user.id, PASSWORD, codes[0], source=SOURCE))
        assert not world.current().mfa_enabled

    def test_disable_without_mfa_is_a_failed_precondition(self, world: Mfa) -> None:
        world.enable()  # pending is not on
        with pytest.raises(FailedPrecondition, match=r"^MFA is off$"):
            run(world.mfa.disable(world.user.id, PASSWORD, "123456", source=SOURCE))

    def test_an_admin_reset_removes_any_enrollment_and_ends_everything(
        self, world: Mfa, log: pytest.LogCaptureFixture
    ) -> None:
        world.turned_on()
        session = world.open_session()
        world.credentials.notices.clear()
        log.clear()
        world.clock.advance(seconds=1)
        user = run(world.mfa.reset(world.user.id))
        assert user.updated_at == world.clock.now()
        logged(log, "mfa changed", user_id=world.user.id, change="reset")
        assert not user.mfa_enabled
        assert world.credentials.accounts[world.user.id].mfa is None
        assert world.signed_out(session)
        assert world.credentials.notices == [security_notice(world.service.mail_renderer, world.user, "mfa-reset")]
        with pytest.raises(FailedPrecondition, match=r"^MFA is off$"):
            run(world.mfa.reset(world.user.id))
        world.enable()
        run(world.mfa.reset(world.user.id))  # a pending enrollment goes too
        assert world.credentials.accounts[world.user.id].mfa is None

    def test_an_admin_reset_of_nobody_is_not_found(self, world: Mfa) -> None:
        with pytest.raises(NotFound):
            run(world.mfa.reset("f" * 24))
        with pytest.raises(InvalidArgument):
            run(world.mfa.reset("nope"))


class TestRaces:
    """The conditional update decides: a change that finds MFA turned off meanwhile says so."""

    def test_a_disable_that_loses_the_race_is_told_mfa_is_off(
        self, world: Mfa, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, codes = world.turned_on()

        async def already_off(*args: object) -> bool:
            return False

        monkeypatch.setattr(world.credentials, "disable_mfa", already_off)
        monkeypatch.setattr(world.credentials, "replace_recovery_codes", already_off)
        with pytest.raises(FailedPrecondition, match=r"^MFA is off$"):
            run(world.mfa.disable(world.user.id, PASSWORD, codes[0], source=SOURCE))
        with pytest.raises(FailedPrecondition, match=r"^MFA is off$"):
            run(world.mfa.regenerate_recovery_codes(world.user.id, codes[1]))

    @pytest.mark.parametrize("meanwhile", ["turned off", "turned off and enrolling again"])
    def test_a_code_checked_after_mfa_changed_meanwhile_is_refused(
        self, world: Mfa, monkeypatch: pytest.MonkeyPatch, meanwhile: str
    ) -> None:
        """The sign-in saw MFA on; before its code was checked another call turned MFA off (and
        perhaps began a new enrollment, not confirmed yet): the code is refused, even one that
        the secret left behind would accept."""
        secret, _ = world.turned_on()
        reserve = world.credentials.reserve_mfa_attempt

        async def reserved_while_mfa_changes(user_id: str, now: datetime, **limits: int) -> bool:
            reserved = await reserve(user_id, now, **limits)
            account = world.credentials.accounts[user_id]
            assert account.mfa is not None
            left = None if meanwhile == "turned off" else dataclasses.replace(account.mfa, active=False)
            world.credentials.accounts[user_id] = dataclasses.replace(account, mfa=left)
            return reserved

        monkeypatch.setattr(world.credentials, "reserve_mfa_attempt", reserved_while_mfa_changes)
        with pytest.raises(InvalidSecondFactor):
            world.login(totp_code=totp(secret, world.step))


class TestRecoveryCodes:
    def test_new_codes_replace_the_old_ones(self, world: Mfa, log: pytest.LogCaptureFixture) -> None:
        secret, old = world.turned_on()
        new = run(world.mfa.regenerate_recovery_codes(world.user.id, totp(secret, world.step)))
        logged(log, "recovery codes replaced", user_id=world.user.id)
        assert len(new) == 10
        assert not set(new) & set(old)
        with pytest.raises(InvalidSecondFactor):
            world.login(recovery_code=old[1])
        assert world.login(recovery_code=new[0]).id == world.user.id

    def test_new_codes_take_a_valid_second_factor(self, world: Mfa) -> None:
        _, old = world.turned_on()
        with pytest.raises(InvalidSecondFactor):
            run(world.mfa.regenerate_recovery_codes(world.user.id, "aaaa-bbbb-cccc"))
        with pytest.raises(InvalidArgument) as error:
            run(world.mfa.regenerate_recovery_codes(world.user.id, "12345"))
        assert fields(error) == [
            (
                "code",
                "must be the 6-digit code of the authenticator app"
                " or a recovery code (letters and digits, dashes optional)",
            )
        ]
        assert world.login(recovery_code=old[0]).id == world.user.id

    def test_new_codes_without_mfa_is_a_failed_precondition(self, world: Mfa) -> None:
        with pytest.raises(FailedPrecondition, match=r"^MFA is off$"):
            run(world.mfa.regenerate_recovery_codes(world.user.id, "123456"))
