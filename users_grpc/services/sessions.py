"""Sessions: sign-in, refresh-token rotation with replay detection, sign-out, revocation.

A refresh token is ``<session id>.<generation>.<secret>`` and works once:
refreshing moves its session to the next generation, with a new token, in a
single conditional update, so two racing refreshes cannot both succeed. A
token of an earlier generation presented again is treated as stolen and the
whole session is revoked (RFC 9700 4.14.2).

The secret is 128 random bits and a MAC (HMAC-SHA256, 128 bits, under a key
derived from the key-encryption key) over the session id, the generation and
those bits. The MAC tells a token we issued from a forgery without a list of
used tokens, so a session takes constant space however often it is refreshed:
an old token of a real session revokes it, while a made-up token naming a
known session id (ids are in ListSessions and the access token's ``sid``) is
refused and changes nothing. The database keeps only the generation and a
keyed digest of the current token.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from users_grpc.domain import base64url, rules
from users_grpc.domain.errors import FieldViolation, InvalidArgument, PasskeysDisabled, Unauthenticated
from users_grpc.domain.model import AccessClaims, IssuedTokens, Session, User
from users_grpc.domain.ports import Clock, SecretDigests, SessionRepository, UserRepository
from users_grpc.services.groups import GroupService
from users_grpc.services.mfa import MfaService
from users_grpc.services.passkeys import PasskeyService
from users_grpc.services.password_policy import PasswordRules
from users_grpc.services.tokens import AccessTokens

log = logging.getLogger(__name__)

_REFRESH_TOKEN_MAX_LENGTH = 128
_NONCE_BYTES = 16
_TAG_BYTES = 16
# Far beyond any real session (a refresh a second for a year is 3e7), small enough for a 64-bit integer.
_MAX_GENERATION = 10**15


@dataclass(frozen=True)
class RefreshToken:
    """A refresh token we issued (or are issuing), with the session and generation it names."""

    session_id: str
    generation: int
    text: str


class SessionService:
    def __init__(
        self,
        *,
        logins: MfaService,
        users: UserRepository,
        sessions: SessionRepository,
        tokens: AccessTokens,
        digests: SecretDigests,
        clock: Clock,
        session_lifetime: timedelta,
        groups: GroupService | None = None,
        passkeys: PasskeyService | None = None,
        password_rules: PasswordRules | None = None,
    ) -> None:
        self._password_rules = password_rules
        self._passkeys = passkeys
        self._logins = logins
        self._users = users
        self._sessions = sessions
        self._tokens = tokens
        self._digests = digests
        self._clock = clock
        self._session_lifetime = session_lifetime
        # The groups claim of each new access token (None: tokens name no groups).
        self._groups = groups

    async def authenticate(
        self,
        identifier: str,
        password: str,
        totp_code: str = "",
        recovery_code: str = "",
        *,
        source: str,
        passkey: tuple[str, str] = ("", ""),
    ) -> tuple[User, IssuedTokens]:
        """Check the credentials and second factor (as VerifyCredentials does) and open a session."""
        user = await self._logins.verify_login(
            identifier, password, totp_code, recovery_code, source=source, passkey=passkey
        )
        self._refuse_until_password_changed(user)
        return user, await self._open(user)

    async def sign_in_with_passkey(
        self, ceremony_id: str, credential_json: str, *, source: str
    ) -> tuple[User, IssuedTokens]:
        """A passwordless sign-in (PasskeyService.finish_sign_in), then the session Authenticate opens."""
        if self._passkeys is None:
            raise PasskeysDisabled()
        user = await self._passkeys.finish_sign_in(ceremony_id, credential_json, source=source)
        if user.password_change_required:
            # An admin's demand holds for every way in (else a passkey a taker added outlives the
            # reset); a password's age does not: a passkey proves no password, and may be the only factor.
            self._refuse_until_password_changed(user)
        return user, await self._open(user)

    async def _open(self, user: User) -> IssuedTokens:
        session_id = self._sessions.new_id()
        refresh_token = self._new_refresh_token(session_id, 0)
        now = self._clock.now()
        session = await self._sessions.create(
            session_id, user.id, self._digest(refresh_token), now, now + self._session_lifetime, user.token_version
        )
        log.info("session opened", extra={"user_id": user.id, "session_id": session.id})
        return await self._issue(user, session, refresh_token.text)

    def _refuse_until_password_changed(self, user: User) -> None:
        """After the right password and second factor: no session while the password must change
        (an admin asked, or it is too old), only a token for ChangePassword."""
        if self._password_rules is None:
            return
        due = self._password_rules.change_due(user, self._clock.now())
        if due is None:
            return
        token, expires_at = self._tokens.issue_password_change(
            user, self._password_rules.lifecycle.change_token_lifetime
        )
        log.info("sign-in held until the password is changed", extra={"user_id": user.id, "reason": due.reason})
        raise due(user_id=user.id, token=token, expires_at=expires_at)

    async def check_password_change_token(self, token: str) -> User:
        """The user a password-change token speaks for, if it is still valid: active, and the
        password not changed since (the change bumps the token version)."""
        user_id, version = await self._tokens.verify_password_change(token)
        user = await self._users.get(user_id)
        if user is None or not user.is_active or user.token_version != version:
            raise Unauthenticated("access token revoked")
        return user

    async def refresh(self, refresh_token: str) -> IssuedTokens:
        presented = self._genuine(refresh_token)
        if presented is None:
            raise Unauthenticated("invalid refresh token")
        replacement = self._new_refresh_token(presented.session_id, presented.generation + 1)
        now = self._clock.now()
        session = await self._rotate(presented, replacement, now)
        if session is None:
            # A token we issued, no longer current: used up before, by its owner or a thief. Of two
            # racing refreshes the loser lands here too, by design: the session cannot tell them apart.
            revoked = await self._sessions.revoke_replayed(presented.session_id, presented.generation, now)
            if revoked is not None:
                log.warning(
                    "refresh token replayed; session revoked",
                    extra={"user_id": revoked.user_id, "session_id": revoked.id},
                )
            raise Unauthenticated("invalid refresh token")
        user = await self._users.get(session.user_id)
        if user is None or not user.is_active or user.token_version != session.token_version:
            raise Unauthenticated("invalid refresh token")
        return await self._issue(user, session, replacement.text)

    async def revoke(self, refresh_token: str) -> None:
        """Sign out: any token the session issued ends it; anything else changes nothing."""
        presented = self._genuine(refresh_token)
        if presented is not None:
            await self._sessions.revoke(presented.session_id, self._clock.now())
            log.info("session revoked", extra={"session_id": presented.session_id})

    async def list_sessions(self, user_id: str) -> list[Session]:
        rules.validate_user_id(user_id, "user_id")
        return await self._sessions.list_active(user_id, self._clock.now())

    async def revoke_all(self, user_id: str) -> None:
        """End every session and, through the token version, every access token issued so far."""
        rules.validate_user_id(user_id, "user_id")
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

    def _new_refresh_token(self, session_id: str, generation: int) -> RefreshToken:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        secret = base64url.encode(nonce + self._tag(session_id, generation, nonce))
        return RefreshToken(session_id, generation, f"{session_id}.{generation}.{secret}")

    async def _rotate(self, presented: RefreshToken, replacement: RefreshToken, now: datetime) -> Session | None:
        # One try per digest root, the current one first: a session last refreshed before a new
        # root started stores its token's digest under an older one (and moves to the new root now).
        new_digest = self._digest(replacement)
        for digest in self._digests.digests("refresh-token", presented.session_id, presented.text):
            session = await self._sessions.rotate(presented.session_id, presented.generation, digest, new_digest, now)
            if session is not None:
                return session
        return None

    def _tag(self, session_id: str, generation: int, nonce: bytes) -> bytes:
        return self._tags(session_id, generation, nonce)[0]

    def _tags(self, session_id: str, generation: int, nonce: bytes) -> list[bytes]:
        """The tag under each digest root, the current one first (what new tokens carry)."""
        # Bound to the session (the digest's subject), the generation and the random part.
        macs = self._digests.digests("refresh-token-tag", session_id, f"{generation}.{base64url.encode(nonce)}")
        return [bytes.fromhex(mac.rpartition(":")[2])[:_TAG_BYTES] for mac in macs]

    def _genuine(self, refresh_token: str) -> RefreshToken | None:
        """The token taken apart if we issued it (for some generation of its session); else None."""
        _validate_refresh_token(refresh_token)
        parsed = _parse(refresh_token)
        if parsed is None:
            return None
        session_id, generation, nonce, tag = parsed
        # Not any() over a generator: every tag is compared, so the time taken tells nothing.
        if not [
            expected for expected in self._tags(session_id, generation, nonce) if hmac.compare_digest(tag, expected)
        ]:
            log.warning("forged refresh token refused", extra={"session_id": session_id})
            return None
        return RefreshToken(session_id, generation, refresh_token)

    def _digest(self, token: RefreshToken) -> str:
        # What the session stores: keyed, so a copy of the database can neither use nor test a token.
        return self._digests.digest("refresh-token", token.session_id, token.text)

    async def _issue(self, user: User, session: Session, refresh_token: str) -> IssuedTokens:
        # Read at every issue, so a membership change shows in the user's next token.
        groups = () if self._groups is None else await self._groups.token_groups(user.id)
        access_token, expires_at = self._tokens.issue(user, session.id, groups)
        return IssuedTokens(
            access_token=access_token,
            access_token_expires_at=expires_at,
            refresh_token=refresh_token,
            session=session,
        )


def _parse(refresh_token: str) -> tuple[str, int, bytes, bytes] | None:
    """Session id, generation, nonce and tag of a well-formed token; None for anything else,
    tokens of the earlier format (no dots) included."""
    parts = refresh_token.split(".")
    if len(parts) != 3:
        return None
    session_id, generation, secret = parts
    if not rules.is_id(session_id) or not generation.isascii() or not generation.isdigit():
        return None
    if len(generation) > 1 and generation.startswith("0"):
        return None
    try:
        raw = base64url.decode(secret)
    except ValueError:
        return None
    if len(raw) != _NONCE_BYTES + _TAG_BYTES or base64url.encode(raw) != secret or int(generation) > _MAX_GENERATION:
        return None
    return session_id, int(generation), raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]


def _validate_refresh_token(refresh_token: str) -> None:
    if not refresh_token:
        raise InvalidArgument([FieldViolation("refresh_token", "is required")])
    if len(refresh_token) > _REFRESH_TOKEN_MAX_LENGTH:
        raise InvalidArgument([FieldViolation("refresh_token", "is not a refresh token")])
