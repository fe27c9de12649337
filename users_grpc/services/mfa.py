"""TOTP second factor (RFC 6238: SHA-1, 6 digits, 30-second steps) with single-use recovery codes.

Secrets are sealed with AES-GCM at rest and shown only while an enrollment is
pending. A code is accepted for the current step or the one before, and only
if its step is newer than the last accepted one, recorded in the same
conditional update: so each code works once, even when sent twice at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
import qrcode
import qrcode.image.pure

from users_grpc.domain import model, rules
from users_grpc.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    InvalidSecondFactor,
    MfaRequired,
    NotFound,
    TooManyAttempts,
)
from users_grpc.domain.model import User
from users_grpc.domain.ports import Clock, CredentialRepository, Mailer, SecretDigests, SessionRepository
from users_grpc.services.accounts import AccountService
from users_grpc.services.notices import security_notice
from users_grpc.services.passkeys import PasskeyService
from users_grpc.services.passwords import sign_out_everywhere
from users_grpc.services.tokens import KeyEncryption

log = logging.getLogger(__name__)

STEP_SECONDS = 30
DIGITS = 6
RECOVERY_CODE_COUNT = 10
_RECOVERY_CODE_CHARS = 12
# As shown (xxxx-xxxx-xxxx), in any letter case, with dashes or spaces or neither.
_RECOVERY_CODE_PATTERN = re.compile(r"[A-Za-z0-9 -]{1,32}")


def totp(secret: str, step: int, digits: int = DIGITS) -> str:
    """The code of ``step`` (seconds since the epoch // 30) for a base32 ``secret``."""
    return pyotp.TOTP(secret, digits=digits, interval=STEP_SECONDS).generate_otp(step)


def accepted_step(secret: str, code: str, now: datetime) -> int | None:
    """The step ``code`` belongs to, among the current one and the one before; else None.

    pyotp's valid_window is symmetric (it would accept the next step too), hence this.
    """
    current = int(now.timestamp()) // STEP_SECONDS
    for step in (current, current - 1):
        if hmac.compare_digest(totp(secret, step), code):
            return step
    return None


@dataclass(frozen=True)
class Enrollment:
    secret: str
    otpauth_uri: str
    qr_code_png: bytes


class MfaService:
    def __init__(
        self,
        *,
        accounts: AccountService,
        credentials: CredentialRepository,
        sessions: SessionRepository,
        mailer: Mailer,
        encryption: KeyEncryption,
        digests: SecretDigests,
        clock: Clock,
        issuer: str,
        max_attempts: int,
        attempt_window: timedelta,
        passkeys: PasskeyService | None = None,
    ) -> None:
        self._passkeys = passkeys
        self._accounts = accounts
        self._credentials = credentials
        self._sessions = sessions
        self._mailer = mailer
        self._encryption = encryption
        self._digests = digests
        self._clock = clock
        self._issuer = issuer
        self._max_attempts = max_attempts
        self._attempt_window = attempt_window

    async def verify_login(
        self,
        identifier: str,
        password: str,
        totp_code: str,
        recovery_code: str,
        *,
        source: str,
        passkey: tuple[str, str] = ("", ""),
    ) -> User:
        """The user if the password and, with MFA on, the second factor are right: a code, or
        ``passkey`` (a second-factor ceremony id and the browser's assertion for it)."""
        ceremony_id, credential_json = passkey
        if bool(ceremony_id) != bool(credential_json):
            missing = "passkey_credential_json" if ceremony_id else "passkey_ceremony_id"
            raise InvalidArgument([FieldViolation(missing, "is required with the other passkey field")])
        # Checked first: a code that cannot be one is refused without spending any attempt.
        if ceremony_id:
            code = ""
        elif totp_code:
            code = _validated_code(totp_code, "totp_code", recovery=False)
        elif recovery_code:
            code = _validated_code(recovery_code, "recovery_code", totp=False)
        else:
            code = ""
        user = await self._accounts.verify_credentials(identifier, password, source=source)
        if user.mfa_enabled and ceremony_id and self._passkeys is not None:
            await self._reserve_attempt(user.id)
            await self._passkeys.verify_second_factor(user, ceremony_id, credential_json, source=source)
        elif user.mfa_enabled:
            if not code:
                # Told only after the right password, so it reveals nothing to a guesser.
                raise MfaRequired()
            await self._check_second_factor(user.id, code)
        return user

    async def enable(self, user_id: str, password: str, *, source: str) -> Enrollment:
        """Start an enrollment. It takes the password: a token alone must not put another
        authenticator (and its recovery codes) on the account."""
        rules.validate_user_id(user_id, "user_id")
        rules.validate_login_password(password)
        account = await self._credentials.get_account(user_id)
        if not await self._accounts.password_matches(account, password, source=source):
            raise InvalidCredentials()
        assert account is not None
        user = account.user
        secret = pyotp.random_base32()  # 160 bits (RFC 4226 recommends 160)
        sealed = self._encryption.seal(secret.encode(), totp_context(user_id))
        if not await self._credentials.start_mfa_enrollment(user_id, sealed, self._clock.now()):
            raise FailedPrecondition("MFA is already on")
        log.info("mfa enrollment started", extra={"user_id": user_id})
        return self._enrollment(user, secret)

    async def qr_code(self, user_id: str) -> Enrollment:
        account, sealed_secret = await self._pending_enrollment(user_id)
        return self._enrollment(account.user, self._secret(user_id, sealed_secret))

    async def confirm(self, user_id: str, code: str) -> list[str]:
        _validate_totp_code(code, "code")
        account, sealed_secret = await self._pending_enrollment(user_id)
        await self._reserve_attempt(user_id)
        step = accepted_step(self._secret(user_id, sealed_secret), code, self._clock.now())
        recovery_codes = _new_recovery_codes()
        digests = [self._recovery_digest(user_id, c) for c in recovery_codes]
        notice = security_notice(self._accounts.mail_renderer, account.user, "mfa-enabled")
        if step is None or not await self._credentials.confirm_mfa(user_id, step, digests, self._clock.now(), notice):
            raise InvalidSecondFactor()
        await self._after_change(account.user, "on")
        return recovery_codes

    async def disable(self, user_id: str, password: str, code: str, *, source: str) -> None:
        if not password:
            raise InvalidArgument([FieldViolation("password", "is required")])
        code = _validated_code(code, "code")
        account = await self._active_account(user_id)
        if not await self._accounts.password_matches(account, password, source=source):
            raise InvalidCredentials()
        await self._check_second_factor(user_id, code)
        notice = security_notice(self._accounts.mail_renderer, account.user, "mfa-disabled")
        if not await self._credentials.disable_mfa(user_id, self._clock.now(), notice):
            raise FailedPrecondition("MFA is off")
        await self._after_change(account.user, "off")

    async def reset(self, user_id: str) -> User:
        """For an admin helping a user who lost both authenticator and recovery codes: MFA off
        (a pending enrollment goes too), every session and token ended, the user told."""
        rules.validate_user_id(user_id, "user_id")
        account = await self._credentials.get_account(user_id)
        if account is None:
            raise NotFound()
        notice = security_notice(self._accounts.mail_renderer, account.user, "mfa-reset")
        if account.mfa is None or not await self._credentials.reset_mfa(user_id, self._clock.now(), notice):
            raise FailedPrecondition("MFA is off")
        await self._after_change(account.user, "reset")
        return await self._accounts.get_user(user_id)

    async def regenerate_recovery_codes(self, user_id: str, code: str) -> list[str]:
        code = _validated_code(code, "code")
        await self._active_account(user_id)
        await self._check_second_factor(user_id, code)
        recovery_codes = _new_recovery_codes()
        digests = [self._recovery_digest(user_id, c) for c in recovery_codes]
        if not await self._credentials.replace_recovery_codes(user_id, digests):
            raise FailedPrecondition("MFA is off")
        log.info("recovery codes replaced", extra={"user_id": user_id})
        return recovery_codes

    async def _check_second_factor(self, user_id: str, code: str) -> None:
        """Accept a TOTP code or a recovery code (as :func:`_validated_code` passed it) once;
        throttle wrong ones."""
        await self._reserve_attempt(user_id)
        account = await self._credentials.get_account(user_id)
        if account is None or account.mfa is None or not account.mfa.active:
            raise InvalidSecondFactor()
        if _is_totp_code(code):
            step = accepted_step(self._secret(user_id, account.mfa.sealed_secret), code, self._clock.now())
            accepted = step is not None and await self._credentials.use_totp_step(user_id, step)
        else:
            accepted = await self._use_recovery_code(user_id, code)
        if not accepted:
            log.info("second factor refused", extra={"user_id": user_id})
            raise InvalidSecondFactor()

    async def _use_recovery_code(self, user_id: str, code: str) -> bool:
        # Under each digest root, the current one first: codes made before a new root started
        # are stored under an older one.
        for digest in self._digests.digests("recovery-code", user_id, _normalized_recovery_code(code)):
            if await self._credentials.use_recovery_code(user_id, digest):
                return True
        # Codes issued before digests were keyed are stored under the old unkeyed digest: each
        # still works once. RegenerateRecoveryCodes replaces the whole set with keyed ones.
        if await self._credentials.use_recovery_code(user_id, _legacy_recovery_digest(code)):
            log.info("legacy recovery code used", extra={"user_id": user_id})
            return True
        return False

    def _recovery_digest(self, user_id: str, code: str) -> str:
        # 60 random bits: keyed and bound to the user, a copy of the database gives nothing to test.
        return self._digests.digest("recovery-code", user_id, _normalized_recovery_code(code))

    async def _reserve_attempt(self, user_id: str) -> None:
        # Spent before the code is compared, so parallel guesses cannot exceed the cap.
        if not await self._credentials.reserve_mfa_attempt(
            user_id,
            self._clock.now(),
            max_attempts=self._max_attempts,
            window_seconds=int(self._attempt_window.total_seconds()),
        ):
            log.warning("second factor throttled", extra={"user_id": user_id})
            raise TooManyAttempts()

    async def _pending_enrollment(self, user_id: str) -> tuple[model.Account, bytes]:
        """The account and sealed secret of an enrollment awaiting ConfirmMfa."""
        rules.validate_user_id(user_id, "user_id")
        account = await self._credentials.get_account(user_id)
        if account is None or account.mfa is None or account.mfa.active:
            raise FailedPrecondition("no pending MFA enrollment: call EnableMfa")
        return account, account.mfa.sealed_secret

    async def _active_account(self, user_id: str) -> model.Account:
        rules.validate_user_id(user_id, "user_id")
        account = await self._credentials.get_account(user_id)
        if account is None or account.mfa is None or not account.mfa.active:
            raise FailedPrecondition("MFA is off")
        return account

    def _secret(self, user_id: str, sealed: bytes) -> str:
        return self._encryption.open(sealed, totp_context(user_id)).decode()

    def _enrollment(self, user: User, secret: str) -> Enrollment:
        uri = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
            name=user.email, issuer_name=self._issuer
        )
        png = io.BytesIO()
        qrcode.make(uri, image_factory=qrcode.image.pure.PyPNGImage).save(png)
        return Enrollment(secret=secret, otpauth_uri=uri, qr_code_png=png.getvalue())

    async def _after_change(self, user: User, change: str) -> None:
        log.info("mfa changed", extra={"user_id": user.id, "change": change})
        await sign_out_everywhere(sessions=self._sessions, mailer=self._mailer, clock=self._clock, user=user)


def _validate_totp_code(code: str, field: str) -> None:
    if not _is_totp_code(code):
        raise InvalidArgument([FieldViolation(field, f"must be the {DIGITS}-digit code of the authenticator app")])


def _is_totp_code(code: str) -> bool:
    # ASCII only: str.isdigit() also admits other scripts' digits (Arabic-Indic, fullwidth...).
    return len(code) == DIGITS and code.isascii() and code.isdigit()


def _is_recovery_code(code: str) -> bool:
    if _RECOVERY_CODE_PATTERN.fullmatch(code) is None:
        return False
    return len(_normalized_recovery_code(code)) == _RECOVERY_CODE_CHARS


def _validated_code(code: str, field: str, *, totp: bool = True, recovery: bool = True) -> str:
    """``code`` if it has the form of a TOTP code or a recovery code (as allowed); else InvalidArgument.

    Run before any attempt is counted: a malformed code is a mistake to point out, not a guess.
    """
    if not code:
        raise InvalidArgument([FieldViolation(field, "is required")])
    if (totp and _is_totp_code(code)) or (recovery and _is_recovery_code(code)):
        return code
    forms = [
        *([f"the {DIGITS}-digit code of the authenticator app"] if totp else []),
        *(["a recovery code (letters and digits, dashes optional)"] if recovery else []),
    ]
    raise InvalidArgument([FieldViolation(field, f"must be {' or '.join(forms)}")])


def totp_context(user_id: str) -> str:
    # Binds a sealed secret to its purpose and user: it cannot be moved to another account.
    return f"totp:{user_id}"


def _new_recovery_codes() -> list[str]:
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = base64.b32encode(secrets.token_bytes(8)).decode()[:_RECOVERY_CODE_CHARS].lower()  # 60 bits
        codes.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
    return codes


def _normalized_recovery_code(code: str) -> str:
    return code.strip().lower().replace("-", "").replace(" ", "")


def _legacy_recovery_digest(code: str) -> str:
    """The unkeyed digest recovery codes were stored under before; only ever compared, never stored."""
    return hashlib.sha256(f"recovery\0{_normalized_recovery_code(code)}".encode()).hexdigest()
