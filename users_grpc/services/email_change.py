"""Changing a user's email: the user confirms the new address with a mailed code; an admin sets one at once.

Until the code comes back, sign-in and mail keep using the old address. The code follows the
activation rules: 6 digits, stored only as a keyed digest bound to the user *and* the new
address (a code mailed for one address confirms no other), single use, expiring, its guesses
capped and each spent before the comparison, its mails capped per window. The new address must
be free when the change takes effect: the swap is one conditional update that the unique
``email_key`` index guards, so of two accounts racing for an address one gets it.

Sessions survive a change of address: access tokens do not carry the email, and the caller
just proved both the password and the new mailbox. Sign-in by the old address stops at once,
since sign-in looks the account up by its current ``email_key``.

The notices to the old address are durable: each is pended in the user's document by the very
update that requests or makes the change (see :mod:`users_grpc.services.mail`), so no crash, deadline or
cancellation can make the change without its notice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from users_grpc.domain import rules
from users_grpc.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    InvalidEmailChangeCode,
    NotFound,
    TooManyAttempts,
)
from users_grpc.domain.model import ActivationCode, Mail, PendingEmailChange, User
from users_grpc.domain.ports import Clock, EmailChangeRepository, Mailer, SecretDigests
from users_grpc.services.accounts import AccountService, mail_values
from users_grpc.services.notices import security_notice

# An admin's change is retried this often when the user's address changes between reading it and the swap.
_SET_EMAIL_ROUNDS = 3

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EmailChangePolicy:
    code_ttl: timedelta = timedelta(minutes=15)
    max_attempts: int = 5
    max_sends: int = 5
    send_window: timedelta = timedelta(hours=1)


class EmailChangeService:
    def __init__(
        self,
        *,
        accounts: AccountService,
        users: EmailChangeRepository,
        mailer: Mailer,
        digests: SecretDigests,
        clock: Clock,
        policy: EmailChangePolicy,
    ) -> None:
        self._accounts = accounts
        self._users = users
        self._mailer = mailer
        self._digests = digests
        self._clock = clock
        self._policy = policy

    async def change_email(self, user_id: str, new_email: str, password: str, *, source: str) -> None:
        """Mail a code to ``new_email`` and a notice to the current address; nothing changes yet.

        A new request replaces a pending one (its code dies). Whether the address is taken is
        not checked here but at confirmation, where it must be free: so only the reader of the
        new mailbox learns it.
        """
        rules.validate_user_id(user_id, "user_id")
        email = _normalized_email(new_email, "new_email")
        rules.validate_login_password(password)
        account = await self._users.get_account(user_id)
        if account is None:
            raise InvalidCredentials()
        if email == account.user.email:
            raise InvalidArgument([FieldViolation("new_email", "is the account's email already")])
        if not await self._accounts.password_matches(account, password, source=source):
            raise InvalidCredentials("the password is wrong")
        user = account.user
        code = rules.new_activation_code()
        now = self._clock.now()
        pended = await self._users.pend_email_change(
            user.id,
            PendingEmailChange(
                new_email=email,
                code=ActivationCode(
                    digest=self._digest(user.id, email, code),
                    expires_at=now + self._policy.code_ttl,
                    attempts_left=self._policy.max_attempts,
                    sends_in_window=1,
                    window_started_at=now,
                ),
            ),
            max_sends=self._policy.max_sends,
            window_seconds=int(self._policy.send_window.total_seconds()),
            notice=security_notice(self._accounts.mail_renderer, user, "email-change-requested"),
        )
        if not pended:
            log.info("email change capped", extra={"user_id": user.id})
            raise TooManyAttempts(
                "too many email-change codes were sent; try again later", retry_after=self._policy.send_window
            )
        # The code goes to the new address only: reading it proves that mailbox. Not a notice: a
        # code lost with a crash is asked for again.
        await self._mailer.send(self._code_mail(user, email, code))
        self._mailer.wake()
        log.info("email change requested", extra={"user_id": user.id})

    async def confirm_email_change(self, user_id: str, code: str) -> User:
        """Make the pending address the user's, with the code mailed to it; the user as changed."""
        rules.validate_user_id(user_id, "user_id")
        if len(code) != rules.ACTIVATION_CODE_DIGITS or not code.isascii() or not code.isdigit():
            raise InvalidArgument(
                [FieldViolation("code", f"must be the {rules.ACTIVATION_CODE_DIGITS}-digit code from the email")]
            )
        now = self._clock.now()
        # The attempt is spent before the code is compared, so parallel guesses cannot exceed the cap.
        pending = await self._users.reserve_email_change_attempt(user_id, now)
        changed = None
        if pending is not None:
            # Checked under the digest root the stored digest names.
            digest = pending.code.digest
            matches = self._digests.matches(
                digest, "email-change-code", user_id, _code_and_address(code, pending.new_email)
            )
            account = await self._users.get_account(user_id)
            if matches and account is not None:
                # Raises AlreadyExists if the address was taken meanwhile; then nothing is written
                # and the pending change stays, until it expires or a new request replaces it.
                changed = await self._users.confirm_email_change(
                    user_id,
                    pending.new_email,
                    digest,
                    now,
                    security_notice(self._accounts.mail_renderer, account.user, "email-changed"),
                )
        if changed is None:
            log.info("email change refused", extra={"user_id": user_id})
            raise InvalidEmailChangeCode()
        self._mailer.wake()
        log.info("email changed", extra={"user_id": user_id})
        return changed[1]

    async def set_user_email(self, user_id: str, email: str) -> User:
        """An admin's direct change: set at once, without a code; the old address is told."""
        rules.validate_user_id(user_id, "user_id")
        normalized = _normalized_email(email, "email")
        for _ in range(_SET_EMAIL_ROUNDS):
            account = await self._users.get_account(user_id)
            if account is None:
                raise NotFound()
            notice = None
            if account.user.email != normalized:
                notice = security_notice(self._accounts.mail_renderer, account.user, "email-set")
            # With a notice, the swap applies only while the address read is the user's: the
            # notice never goes to an address that was not the one replaced.
            changed = await self._users.set_email(user_id, normalized, self._clock.now(), notice)
            if changed is not None:
                self._mailer.wake()
                log.info("email set by an admin", extra={"user_id": user_id})
                return changed[1]
        raise FailedPrecondition("the user's email changed meanwhile; try again")

    def _digest(self, user_id: str, new_email: str, code: str) -> str:
        # Keyed, bound to the user (the subject) and to the address: a code confirms only the
        # address it was mailed to.
        return self._digests.digest("email-change-code", user_id, _code_and_address(code, new_email))

    def _code_mail(self, user: User, new_email: str, code: str) -> Mail:
        # Greets by username, whose charset is safe; names are free text a stranger chose.
        minutes = int(self._policy.code_ttl.total_seconds() // 60)
        return self._accounts.mail_renderer.render(
            "email-change-code",
            to=new_email,
            values=mail_values(user) | {"code": code, "minutes": minutes},
            language=user.language_code or None,
        )


def _normalized_email(email: str, field: str) -> str:
    """:func:`domain.normalized_email`, its violations named after the request's ``field``."""
    try:
        return rules.normalized_email(email)
    except InvalidArgument as error:
        raise InvalidArgument([FieldViolation(field, v.description) for v in error.violations]) from None


def _code_and_address(code: str, new_email: str) -> str:
    # A code is 6 digits and an address holds no NUL: unambiguous.
    return f"{code}\0{new_email}"
