"""Service-account tokens: long-lived, revocable bearer tokens for a caller that must hold one
static credential for months, such as an identity provider's SCIM connection (Okta's and Entra
ID's "secret token"), where IssueServiceToken's tokens expire within minutes.

Such a token speaks for its service account exactly as the account's IssueServiceToken tokens
do (the same :class:`Caller`, the same permissions), so the access table rules it like any call.
Every call reads the account and the token again, in one read by ``_id``: a revocation, an
expiry or the account's deletion takes effect at once on every replica, and nothing is cached.

The database keeps a keyed digest (HMAC-SHA-256) of the secret, not a bcrypt hash: the secret is
256 random bits, so no guessing needs slowing down (a slow hash protects low-entropy passwords),
and every call with the token checks it, where bcrypt's tens of milliseconds per call would cost
more than the call itself. The comparison is constant-time (hmac.compare_digest). An unknown
token, a revoked one and a wrong secret cost the same read and the same digest, and all answer
the same UNAUTHENTICATED, as do an expired and a malformed one: no reply tells which it was.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta

from users_grpc.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unauthenticated
from users_grpc.domain.groups import group_name
from users_grpc.domain.model import Caller
from users_grpc.domain.ports import Clock, DigestPurpose, SecretDigests, ServiceAccountTokenRepository
from users_grpc.domain.rules import validate_user_id
from users_grpc.domain.service_account_tokens import (
    MAX_TOKENS_PER_ACCOUNT,
    SECRET_BYTES,
    ServiceAccountToken,
    compose,
    parse,
)
from users_grpc.services.service_accounts import ServiceAccountNotFound, machine_caller

log = logging.getLogger(__name__)

_PURPOSE: DigestPurpose = "service-account-token"
_REFUSED = "invalid access token"
# Compared against when the account holds no such token, so that the miss costs a digest too.
_NO_DIGEST = "0" * 64
# last_use_time is written at most this often per token: a write per call would double the
# database work of every SCIM request, and an hour is precise enough to spot an unused token.
LAST_USE_PRECISION = timedelta(hours=1)


class ServiceAccountTokenNotFound(NotFound):
    reason = "SERVICE_ACCOUNT_TOKEN_NOT_FOUND"
    message = "the service account has no token with this id"


class ServiceAccountTokenLimit(FailedPrecondition):
    reason = "SERVICE_ACCOUNT_TOKEN_LIMIT"
    message = f"the service account holds {MAX_TOKENS_PER_ACCOUNT} tokens: revoke one first"


class ServiceAccountTokenService:
    def __init__(
        self,
        *,
        accounts: ServiceAccountTokenRepository,
        digests: SecretDigests,
        clock: Clock,
        max_lifetime: timedelta | None,
    ) -> None:
        self._accounts = accounts
        self._digests = digests
        self._clock = clock
        # None: a token may live forever (USERS_SERVICE_ACCOUNT_TOKEN_MAX_DAYS=0).
        self._max_lifetime = max_lifetime

    async def create(
        self, service_account_id: str, display_name: str, expires_at: datetime | None, *, caller: Caller
    ) -> tuple[ServiceAccountToken, str]:
        """A new token of the account, and the token itself, which is returned here once and never stored."""
        validate_user_id(service_account_id, "service_account_id")
        # The rule of a group's name: 1 to 64 characters, stripped, no control or format characters.
        name = group_name(display_name, "display_name")
        now = self._clock.now()
        token = ServiceAccountToken(
            id=self._accounts.new_id(),
            service_account_id=service_account_id,
            display_name=name,
            created_at=now,
            expires_at=self._expiry(now, expires_at),
            last_used_at=None,
        )
        secret = secrets.token_urlsafe(SECRET_BYTES)
        digest = self._digests.digest(_PURPOSE, _subject(service_account_id, token.id), secret)
        if not await self._accounts.add_token(token, digest, MAX_TOKENS_PER_ACCOUNT):
            if await self._accounts.get(service_account_id) is None:
                raise ServiceAccountNotFound()
            raise ServiceAccountTokenLimit()
        log.info(
            "service account token created",
            extra={"admin_id": caller.user_id, "client_id": service_account_id, "token_id": token.id},
        )
        return token, compose(service_account_id, token.id, secret)

    async def list(self, service_account_id: str) -> list[ServiceAccountToken]:
        validate_user_id(service_account_id, "service_account_id")
        tokens = await self._accounts.tokens(service_account_id)
        if tokens is None:
            raise ServiceAccountNotFound()
        return tokens

    async def revoke(self, service_account_id: str, token_id: str, *, caller: Caller) -> None:
        validate_user_id(service_account_id, "service_account_id")
        validate_user_id(token_id, "token_id")
        if not await self._accounts.revoke_token(service_account_id, token_id):
            raise ServiceAccountTokenNotFound()
        log.info(
            "service account token revoked",
            extra={"admin_id": caller.user_id, "client_id": service_account_id, "token_id": token_id},
        )

    async def caller_of(self, bearer: str) -> Caller:
        """The machine caller a service-account token speaks for; Unauthenticated, with one
        message, for a malformed, unknown, revoked, wrong or expired token."""
        parts = parse(bearer)
        if parts is None:
            raise Unauthenticated(_REFUSED)
        holder = await self._accounts.token_holder(parts.service_account_id, parts.token_id)
        stored = None if holder is None else holder.digest
        subject = _subject(parts.service_account_id, parts.token_id)
        # The digest is made whatever was found: an unknown token costs what a wrong one does.
        matches = self._digests.matches(stored or _NO_DIGEST, _PURPOSE, subject, parts.secret)
        if holder is None or holder.token is None or stored is None or not matches:
            raise Unauthenticated(_REFUSED)
        now = self._clock.now()
        if holder.token.expires_at is not None and holder.token.expires_at <= now:
            raise Unauthenticated(_REFUSED)
        last_used = holder.token.last_used_at
        if last_used is None or now - last_used >= LAST_USE_PRECISION:
            await self._accounts.record_token_use(parts.service_account_id, parts.token_id, now)
        return machine_caller(holder.account)

    def _expiry(self, now: datetime, asked: datetime | None) -> datetime | None:
        if asked is None:
            return None if self._max_lifetime is None else now + self._max_lifetime
        if asked <= now:
            raise InvalidArgument([FieldViolation("expire_time", "must be in the future")])
        if self._max_lifetime is not None and asked > now + self._max_lifetime:
            days = self._max_lifetime.days
            raise InvalidArgument([FieldViolation("expire_time", f"must be at most {days} days from now")])
        return asked


def _subject(service_account_id: str, token_id: str) -> str:
    # Bound to both ids: a digest copied to another token's or account's record never matches there.
    return f"{service_account_id}/{token_id}"
