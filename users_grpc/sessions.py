"""Sessions: sign-in, refresh-token rotation with replay detection, sign-out, revocation.

A refresh token is 256 random bits, stored only as a SHA-256 digest, and works
once: refreshing swaps it for a new one in a single conditional update, so two
racing refreshes cannot both succeed. A token presented after it was swapped
is treated as stolen and its whole session is revoked (RFC 9700 4.14.2).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta

from users_grpc import domain
from users_grpc.domain import AccessClaims, IssuedTokens, Session, User
from users_grpc.errors import FieldViolation, InvalidArgument, Unauthenticated
from users_grpc.mfa import MfaService
from users_grpc.ports import Clock, SessionRepository, UserRepository
from users_grpc.tokens import AccessTokens

log = logging.getLogger(__name__)

_REFRESH_TOKEN_MAX_LENGTH = 128


class SessionService:
    def __init__(
        self,
        *,
        logins: MfaService,
        users: UserRepository,
        sessions: SessionRepository,
        tokens: AccessTokens,
        clock: Clock,
        session_lifetime: timedelta,
    ) -> None:
        self._logins = logins
        self._users = users
        self._sessions = sessions
        self._tokens = tokens
        self._clock = clock
        self._session_lifetime = session_lifetime

    async def authenticate(
        self, identifier: str, password: str, totp_code: str = "", recovery_code: str = "", *, source: str
    ) -> tuple[User, IssuedTokens]:
        """Check the credentials and second factor (as VerifyCredentials does) and open a session."""
        user = await self._logins.verify_login(identifier, password, totp_code, recovery_code, source=source)
        refresh_token = _new_refresh_token()
        now = self._clock.now()
        session = await self._sessions.create(
            user.id, _digest(refresh_token), now, now + self._session_lifetime, user.token_version
        )
        log.info("session opened", extra={"user_id": user.id, "session_id": session.id})
        return user, self._issue(user, session, refresh_token)

    async def refresh(self, refresh_token: str) -> IssuedTokens:
        _validate_refresh_token(refresh_token)
        presented = _digest(refresh_token)
        replacement = _new_refresh_token()
        now = self._clock.now()
        session = await self._sessions.rotate(presented, _digest(replacement), now)
        if session is None:
            revoked = await self._sessions.revoke_family_of_used(presented, now)
            if revoked is not None:
                log.warning(
                    "refresh token replayed; session revoked",
                    extra={"user_id": revoked.user_id, "session_id": revoked.id},
                )
            raise Unauthenticated("invalid refresh token")
        user = await self._users.get(session.user_id)
        if user is None or not user.is_active or user.token_version != session.token_version:
            raise Unauthenticated("invalid refresh token")
        return self._issue(user, session, replacement)

    async def revoke(self, refresh_token: str) -> None:
        _validate_refresh_token(refresh_token)
        await self._sessions.revoke(_digest(refresh_token), self._clock.now())

    async def list_sessions(self, user_id: str) -> list[Session]:
        domain.validate_user_id(user_id, "user_id")
        return await self._sessions.list_active(user_id, self._clock.now())

    async def revoke_all(self, user_id: str) -> None:
        """End every session and, through the token version, every access token issued so far."""
        domain.validate_user_id(user_id, "user_id")
        now = self._clock.now()
        await self._users.bump_token_version(user_id, now)
        await self._sessions.revoke_all(user_id, now)
        log.info("all sessions revoked", extra={"user_id": user_id})

    async def check_access_token(self, access_token: str) -> tuple[AccessClaims, User]:
        """Verify the token and that it still speaks for an active user at its token version."""
        claims = await self._tokens.verify(access_token)
        user = await self._users.get(claims.subject)
        if user is None or not user.is_active or user.token_version != claims.token_version:
            raise Unauthenticated("access token revoked")
        return claims, user

    async def validate(self, access_token: str) -> AccessClaims:
        if not access_token:
            raise InvalidArgument([FieldViolation("access_token", "is required")])
        claims, _ = await self.check_access_token(access_token)
        return claims

    def public_keys(self) -> dict[str, list[dict[str, str]]]:
        return self._tokens.jwks()

    def _issue(self, user: User, session: Session, refresh_token: str) -> IssuedTokens:
        access_token, expires_at = self._tokens.issue(user, session.id)
        return IssuedTokens(
            access_token=access_token,
            access_token_expires_at=expires_at,
            refresh_token=refresh_token,
            session=session,
        )


def _new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def _digest(refresh_token: str) -> str:
    # A plain hash suffices: the token has 256 random bits, so there is nothing to guess.
    return hashlib.sha256(refresh_token.encode()).hexdigest()


def _validate_refresh_token(refresh_token: str) -> None:
    if not refresh_token:
        raise InvalidArgument([FieldViolation("refresh_token", "is required")])
    if len(refresh_token) > _REFRESH_TOKEN_MAX_LENGTH:
        raise InvalidArgument([FieldViolation("refresh_token", "is not a refresh token")])
