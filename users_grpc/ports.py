"""The small interfaces the services depend on.

Real adapters live in :mod:`users_grpc.repository`, :mod:`users_grpc.passwords`
and :mod:`users_grpc.mail`; fakes for unit tests live in ``tests/fakes.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from users_grpc.domain import (
    Account,
    ActivationCode,
    Mail,
    NewUser,
    PendingNotices,
    QueuedMail,
    Session,
    StoredKey,
    User,
)


class UserRepository(Protocol):
    async def add(self, new_user: NewUser) -> User:
        """Store a new user; raise ``AlreadyExists`` naming a taken username or email."""

    async def get(self, user_id: str) -> User | None: ...

    async def get_account(self, user_id: str) -> Account | None: ...

    async def find_account(self, identifier_key: str) -> Account | None:
        """The account whose username or email has this :func:`~users_grpc.domain.identifier_key`."""

    async def reserve_activation_attempt(self, user_id: str, now: datetime) -> ActivationCode | None:
        """Use up one attempt of the user's unexpired pending code and return the code;
        None if there is none, or it has expired or has no attempts left."""

    async def activate(self, user_id: str, code_digest: str, now: datetime) -> User | None:
        """Activate the user if this unexpired code is still pending; else None. Works once."""

    async def replace_activation_code(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        """Pend a new code for an inactive user unless the send cap is reached; True if pended."""

    async def delete(self, user_id: str) -> bool:
        """Delete the user; False if there was none."""

    async def delete_by_identifier(self, identifier_key: str) -> bool: ...

    async def bump_token_version(self, user_id: str, now: datetime) -> None:
        """Make every access token issued to the user so far invalid, and any pending password-reset token."""

    async def reserve_password_attempt(
        self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int
    ) -> bool:
        """Count one password attempt; False once ``max_attempts`` fell in the window."""

    async def clear_password_attempts(self, user_id: str) -> None: ...


class CredentialRepository(Protocol):
    """Password resets and second factors; each change is one conditional update.

    A change the user must be told of takes its ``notice``, pended in that same update
    (see :class:`NoticeStore`): a change never lands without its notice, nor a notice without it.
    """

    async def get_account(self, user_id: str) -> Account | None: ...

    async def find_account(self, identifier_key: str) -> Account | None: ...

    async def replace_password_reset(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool: ...

    async def find_account_by_reset_digest(self, digest: str, now: datetime) -> Account | None: ...

    async def reset_password(
        self, user_id: str, digest: str, password_hash: str, now: datetime, notice: Mail
    ) -> bool: ...

    async def set_password(self, user_id: str, password_hash: str, now: datetime, notice: Mail) -> bool: ...

    async def start_mfa_enrollment(self, user_id: str, sealed_secret: bytes, now: datetime) -> bool: ...

    async def confirm_mfa(
        self, user_id: str, step: int, recovery_digests: list[str], now: datetime, notice: Mail
    ) -> bool: ...

    async def use_totp_step(self, user_id: str, step: int) -> bool: ...

    async def use_recovery_code(self, user_id: str, digest: str) -> bool: ...

    async def replace_recovery_codes(self, user_id: str, digests: list[str]) -> bool: ...

    async def disable_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool: ...

    async def reserve_mfa_attempt(
        self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int
    ) -> bool: ...


class SessionRepository(Protocol):
    async def create(
        self, user_id: str, token_digest: str, now: datetime, expires_at: datetime, token_version: int
    ) -> Session: ...

    async def rotate(self, token_digest: str, new_token_digest: str, now: datetime) -> Session | None:
        """Swap a session's current refresh token for a new one; None unless it was current and live."""

    async def revoke_family_of_used(self, token_digest: str, now: datetime) -> bool:
        """Revoke the session that already used this token, if any (a replay); True if one was revoked."""

    async def revoke(self, token_digest: str, now: datetime) -> None: ...

    async def list_active(self, user_id: str, now: datetime) -> list[Session]: ...

    async def revoke_all(self, user_id: str, now: datetime) -> None: ...


class KeyStore(Protocol):
    """Where signing keys live, shared by every replica."""

    async def add(self, key: StoredKey) -> None: ...

    async def all(self) -> list[StoredKey]: ...

    async def retire(self, kid: str, now: datetime) -> bool: ...


class Mailer(Protocol):
    async def send(self, mail: Mail) -> None:
        """Accept ``mail`` for delivery: durably queued when this returns, delivered later."""

    def wake(self) -> None:
        """Deliver soon: a notice was pended in a user's document (it goes out anyway, a poll later)."""


class PasswordHasher(Protocol):
    async def hash(self, password: str) -> str: ...

    async def verify(self, password: str, password_hash: str | None) -> bool:
        """True if ``password`` matches. ``None`` does the same work and returns False,
        so a missing account takes as long as a wrong password."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""


class MailQueue(Protocol):
    """The outbox: mail waiting for delivery, shared by every replica."""

    async def enqueue(self, mail: Mail, now: datetime, *, mail_id: str | None = None) -> None:
        """Queue ``mail``. With ``mail_id`` (24 hex digits) it is queued under that id, and
        queueing an id that is still queued does nothing."""

    async def claim(self, now: datetime, lease_seconds: float) -> QueuedMail | None:
        """Take the next due mail for ``lease_seconds``; after that another sender may take it."""

    async def delivered(self, mail_id: str) -> None: ...

    async def retry_later(self, mail_id: str, at: datetime, error: str) -> None: ...

    async def give_up(self, mail_id: str, error: str) -> None:
        """Keep the mail, marked failed, for an operator to inspect; never retried."""


class NoticeStore(Protocol):
    """Security notices waiting in user documents, each pended by the update that made its change.

    The mail sender moves them into the outbox: claim a user's notices, queue each under its
    own id (a repeat does nothing), release them. A sender that dies between the steps only
    delays them: its claim runs out and another sender finishes the move. Before a notice's
    outbox copy goes out, :meth:`settle_notice` makes sure it waits in no user document, so
    it cannot be moved and mailed a second time.
    """

    async def claim_pending_notices(self, now: datetime, lease_seconds: float) -> PendingNotices | None:
        """Claim one user's waiting notices for ``lease_seconds``; None when none wait unclaimed."""

    async def release_notices(self, pending: PendingNotices) -> None:
        """Drop the claimed notices (now queued in the outbox) and end the claim."""

    async def settle_notice(self, notice_id: str, now: datetime) -> datetime | None:
        """Drop ``notice_id`` from its user's document if it still waits there. None when done (or
        there is no such notice); else when to try again, while another sender's claim holds it."""


class MailTransport(Protocol):
    async def deliver(self, mail: QueuedMail) -> None:
        """Hand the mail to its next hop; raise if it was not accepted."""
