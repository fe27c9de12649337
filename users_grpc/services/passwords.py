"""Password recovery and change: emailed single-use reset tokens, and changes that end every session."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta

from users_grpc.domain import rules
from users_grpc.domain.errors import (
    EtagMismatch,
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    InvalidResetToken,
    NotFound,
)
from users_grpc.domain.model import Account, ActivationCode, User
from users_grpc.domain.ports import (
    Clock,
    CredentialRepository,
    Mailer,
    NoticeKind,
    PasswordHasher,
    SecretDigests,
    SessionRepository,
)
from users_grpc.domain.rules import PasswordPolicy
from users_grpc.services.accounts import AccountService, mail_values, no_reply_sooner_than
from users_grpc.services.notices import security_notice
from users_grpc.services.password_policy import PasswordRules

log = logging.getLogger(__name__)

_TOKEN_MAX_LENGTH = 128


class PasswordService:
    def __init__(
        self,
        *,
        accounts: AccountService,
        credentials: CredentialRepository,
        sessions: SessionRepository,
        mailer: Mailer,
        hasher: PasswordHasher,
        digests: SecretDigests,
        clock: Clock,
        password_policy: PasswordPolicy,
        reset_token_ttl: timedelta,
        reset_max_sends: int,
        reset_send_window: timedelta,
        reply_floor: timedelta,
        rules: PasswordRules | None = None,
    ) -> None:
        self._reply_floor = reply_floor
        self._rules = rules or PasswordRules(hasher=hasher)
        self._accounts = accounts
        self._credentials = credentials
        self._sessions = sessions
        self._mailer = mailer
        self._hasher = hasher
        self._digests = digests
        self._clock = clock
        self._password_policy = password_policy
        self._reset_token_ttl = reset_token_ttl
        self._reset_max_sends = reset_max_sends
        self._reset_send_window = reset_send_window

    async def forgot_password(self, identifier: str) -> None:
        """Mail a reset token to an active account; do nothing, visibly the same, otherwise.

        The reply never comes sooner than a fixed floor: the work differs by a few milliseconds
        between existing and missing accounts, which the floor hides.
        """
        rules.validate_identifier(identifier)
        async with no_reply_sooner_than(self._reply_floor):
            await self._pend_and_mail_reset_token(identifier)

    async def _pend_and_mail_reset_token(self, identifier: str) -> None:
        account = await self._credentials.find_account(rules.identifier_key(identifier))
        if account is None or not account.user.is_active:
            return
        # The token names its user, so that its digest can be bound to the user.
        secret = secrets.token_urlsafe(32)
        token = f"{account.user.id}.{secret}"
        now = self._clock.now()
        pended = await self._credentials.replace_password_reset(
            account.user.id,
            ActivationCode(
                digest=self._digest(account.user.id, secret),
                expires_at=now + self._reset_token_ttl,
                attempts_left=1,
                sends_in_window=1,
                window_started_at=now,
            ),
            max_sends=self._reset_max_sends,
            window_seconds=int(self._reset_send_window.total_seconds()),
        )
        if not pended:
            log.info("password reset capped", extra={"user_id": account.user.id})
            return
        minutes = int(self._reset_token_ttl.total_seconds() // 60)
        await self._mailer.send(
            self._accounts.mail_renderer.render(
                "password-reset",
                to=account.user.email,
                values=mail_values(account.user) | {"token": token, "minutes": minutes},
                language=account.user.language_code or None,
            )
        )
        log.info("password reset sent", extra={"user_id": account.user.id})

    async def reset_password(self, token: str, new_password: str, confirmation: str, *, source: str) -> None:
        if not token or len(token) > _TOKEN_MAX_LENGTH:
            raise InvalidResetToken()
        user_id, _, secret = token.partition(".")
        if not secret or not rules.is_id(user_id):
            raise InvalidResetToken()
        now = self._clock.now()
        account, digest = await self._account_with_reset_token(user_id, secret, now)
        if account is None:
            raise InvalidResetToken()
        user = account.user
        self._validate_new_password(user, new_password, confirmation)
        await self._refuse_by_policy(account, new_password, "new_password")
        password_hash = await self._hasher.hash(new_password)
        # The conditional update consumes the token (of two racing resets, one wins) and pends the
        # notice: whatever happens to this call, the reset never lands without it. A reset is the
        # user choosing a password, so it clears change_required as a change does.
        notice = security_notice(self._accounts.mail_renderer, user, "password-reset")
        history = self._rules.history_after(account, password_hash)
        if not await self._credentials.reset_password(user.id, digest, password_hash, now, notice, history=history):
            raise InvalidResetToken()
        await self._accounts.owner_proved_mailbox(user.id, source)
        await self._after_password_change(user)

    async def change_password(
        self, user_id: str, current_password: str, new_password: str, confirmation: str, *, source: str
    ) -> None:
        rules.validate_user_id(user_id, "user_id")
        if not current_password:
            raise InvalidArgument([FieldViolation("current_password", "is required")])
        account = await self._credentials.get_account(user_id)
        if account is None:
            raise InvalidCredentials()
        self._validate_new_password(account.user, new_password, confirmation)
        if not await self._accounts.password_matches(account, current_password, source=source):
            raise InvalidCredentials("the current password is wrong")
        await self._refuse_by_policy(account, new_password, "new_password")
        await self._store_new_password(account, new_password, "password-changed", change_required=False)

    async def set_password(self, user_id: str, password: str, confirmation: str, *, change_required: bool) -> User:
        """An admin sets the password (SetPassword): the same rules as any chosen password."""
        rules.validate_user_id(user_id, "user_id")
        account = await self._credentials.get_account(user_id)
        if account is None:
            raise NotFound()
        self._validate_new_password(account.user, password, confirmation, field="password")
        await self._refuse_by_policy(account, password, "password")
        await self._store_new_password(account, password, "password-set", change_required=change_required)
        log.info("password set by an admin", extra={"user_id": user_id, "change_required": change_required})
        stored = await self._credentials.get_account(user_id)
        if stored is None:
            raise NotFound()
        return stored.user

    async def _refuse_by_policy(self, account: Account, password: str, field: str) -> None:
        # The history first: it costs hashing here, the breach check a third party's time.
        await self._rules.refuse_reused(account, password, field)
        await self._rules.refuse_breached(password, field)

    async def _store_new_password(
        self, account: Account, password: str, notice_kind: NoticeKind, *, change_required: bool
    ) -> None:
        password_hash = await self._hasher.hash(password)
        notice = security_notice(self._accounts.mail_renderer, account.user, notice_kind)
        history = self._rules.history_after(account, password_hash)
        stored = await self._credentials.set_password(
            account.user.id, password_hash, self._clock.now(), notice, history=history, change_required=change_required
        )
        if not stored:
            # The password changed since it was read (or the user is being deleted): the history
            # checked is no longer the user's, so nothing is stored; reading again and retrying is safe.
            raise EtagMismatch("the password changed during this call; try again")
        await self._after_password_change(account.user)

    def _digest(self, user_id: str, secret: str) -> str:
        # Keyed and bound to the user: the database alone cannot tell a token, or test one.
        return self._digests.digest("password-reset", user_id, secret)

    async def _account_with_reset_token(self, user_id: str, secret: str, now: datetime) -> tuple[Account | None, str]:
        """The account this token is pending for, and its stored digest; one lookup per digest root
        (the current one first), as a token pended before a new root is stored under an older one."""
        digest = ""
        for digest in self._digests.digests("password-reset", user_id, secret):
            account = await self._credentials.find_account_by_reset_digest(user_id, digest, now)
            if account is not None:
                return account, digest
        return None, digest

    def _validate_new_password(self, user: User, password: str, confirmation: str, field: str = "new_password") -> None:
        violations = self._password_policy.violations(
            password, context_words=(user.username, user.email.partition("@")[0]), field=field
        )
        if not rules.passwords_equal(confirmation, password):
            violations.append(FieldViolation(f"{field}_confirmation", f"must equal {field}"))
        if violations:
            raise InvalidArgument(violations)

    async def _after_password_change(self, user: User) -> None:
        log.info("password set", extra={"user_id": user.id})
        await sign_out_everywhere(sessions=self._sessions, mailer=self._mailer, clock=self._clock, user=user)


async def sign_out_everywhere(*, sessions: SessionRepository, mailer: Mailer, clock: Clock, user: User) -> None:
    """After a change to how the user signs in, which bumped the token version and pended its notice.

    Cleanup only, so a deadline or crash that stops this call here loses nothing: the version
    bump already ended every access token, and RefreshSession refuses a session of an older
    version, so every session is dead already. This marks them revoked (ListSessions shows
    none), and wakes the mail sender, which would otherwise find the notice at its next poll.
    """
    mailer.wake()
    await sessions.revoke_all(user.id, clock.now())
