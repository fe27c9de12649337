"""The rules of a password beyond its strength: not one of the last N, not breached, not too old,
and changed at the next sign-in when an admin asks (docs/security.md, "Password policy")."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from users_grpc.domain.errors import (
    PasswordBreached,
    PasswordChangeRequired,
    PasswordCheckUnavailable,
    PasswordExpired,
    PasswordReused,
)
from users_grpc.domain.model import Account, PasswordHistory, PasswordScheme, User
from users_grpc.domain.ports import BreachCheckFailed, BreachedPasswords, PasswordHasher

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PasswordLifecycle:
    # The last passwords (the current one included) a new one may not equal; 0 keeps none.
    history: int = 5
    # Past this age a sign-in must change the password first; None: passwords never expire.
    max_age: timedelta | None = None
    # How long a password-change token (PasswordChangeRequired) works.
    change_token_lifetime: timedelta = timedelta(minutes=5)
    # Without an answer from the breached-password source: refuse the password (True) or take it.
    breach_check_fails_closed: bool = False


class PasswordRules:
    """Checks a chosen password against the history and the breached corpus, and says when a
    sign-in must change the password first."""

    def __init__(
        self,
        *,
        hasher: PasswordHasher,
        breached: BreachedPasswords | None = None,
        lifecycle: PasswordLifecycle | None = None,
    ) -> None:
        self._hasher = hasher
        self._breached = breached
        self.lifecycle = lifecycle or PasswordLifecycle()

    async def refuse_breached(self, password: str, field: str) -> None:
        """:class:`PasswordBreached` if the corpus holds ``password`` (no check without a source).

        Fails open by default: the corpus is a second line behind the strength rules, and a
        sign-up or reset should not stop working with a third party's API. Fails closed, if
        set, with UNAVAILABLE: retry later."""
        if self._breached is None:
            return
        try:
            breached = await self._breached.is_breached(password)
        except BreachCheckFailed as error:
            log.warning(
                "breached-password check failed",
                extra={"cause": str(error), "fails_closed": self.lifecycle.breach_check_fails_closed},
            )
            if self.lifecycle.breach_check_fails_closed:
                raise PasswordCheckUnavailable() from None
            return
        if breached:
            raise PasswordBreached(field)

    async def refuse_reused(self, account: Account, password: str, field: str) -> None:
        """:class:`PasswordReused` if ``password`` matches one of the last passwords.

        One bcrypt comparison per kept hash, in the hasher's threads (off the event loop), newest
        first and stopping at a match: at most USERS_PASSWORD_HISTORY (capped at 24) runs a change."""
        for password_hash, scheme in reversed(self._kept(account)):
            if await self._hasher.verify(password, password_hash, scheme):
                raise PasswordReused(field, self.lifecycle.history)

    def history_after(self, account: Account, new_hash: str) -> PasswordHistory:
        """The hashes to keep once ``new_hash`` replaces the account's password: the last N only."""
        kept = [password_hash for password_hash, _ in self._kept(account)] + [new_hash]
        last = self.lifecycle.history
        return PasswordHistory(hashes=tuple(kept[-last:]) if last else (), replaces=account.password_hash)

    def change_due(self, user: User, now: datetime) -> type[PasswordChangeRequired] | None:
        """Why a sign-in of ``user`` must change the password first, if it must."""
        if user.password_change_required:
            return PasswordChangeRequired
        max_age = self.lifecycle.max_age
        if max_age is not None and now - user.password_age_start > max_age:
            return PasswordExpired
        return None

    def _kept(self, account: Account) -> list[tuple[str, PasswordScheme]]:
        """The last N passwords' hashes, oldest first, the current one last: also for an account
        whose history was never stored (set before it was kept), which has its current hash only."""
        last = self.lifecycle.history
        if not last:
            return []
        kept = [(password_hash, PasswordScheme.PEPPERED) for password_hash in account.password_history]
        current_missing = not account.password_history or account.password_history[-1] != account.password_hash
        if current_missing and account.password_scheme is not PasswordScheme.NONE:
            kept.append((account.password_hash, account.password_scheme))
        return kept[-last:]
