"""Service accounts: credentials for machine callers that cannot present a client certificate.

A service mesh that terminates TLS in a sidecar hides the caller's certificate from us, so
such a caller proves itself with a client id and a secret instead, traded for a short-lived
access token (:meth:`ServiceAccountService.issue_token`) whose holder counts as a machine
caller in the access table. The secret is 256 random bits, so the database keeps only a keyed
digest of it (no slow hash is needed against guessing); wrong secrets are throttled as
passwords are. Every call with such a token reads the account again, by id (and every open
stream, at each poll): deleting the account ends its tokens, and its streams, at once. Nothing
else revokes an account's token before its expiry, but retiring the key that signed it.

An account's long-lived tokens (``usat_...``, services/service_account_tokens.py) are checked
there; :meth:`ServiceAccountService.caller_of` hands them over, so that both kinds of bearer reach
the access table as the same caller.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import TYPE_CHECKING

from users_grpc.domain import rules
from users_grpc.domain.errors import FieldViolation, InvalidArgument, InvalidCredentials, NotFound, Unauthenticated
from users_grpc.domain.model import Caller, ServiceAccount, ServiceAccountPermission
from users_grpc.domain.ports import Clock, SecretDigests, ServiceAccountRepository
from users_grpc.domain.service_account_tokens import looks_like_token
from users_grpc.services.paging import PageTokens
from users_grpc.services.throttling import PasswordThrottle
from users_grpc.services.tokens import AccessTokens

if TYPE_CHECKING:
    from users_grpc.services.service_account_tokens import ServiceAccountTokenService

log = logging.getLogger(__name__)

_SECRET_BYTES = 32
# token_urlsafe(32) is 43 characters; anything much longer is no secret of ours.
_SECRET_MAX_LENGTH = 128
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Opaque to callers: the last client id (12 bytes) of the page, so the next page starts after it.
_PAGES = PageTokens(position_bytes=12)


class ServiceAccountNotFound(NotFound):
    reason = "SERVICE_ACCOUNT_NOT_FOUND"
    message = "service account not found"


class ServiceAccountService:
    def __init__(
        self,
        *,
        accounts: ServiceAccountRepository,
        tokens: AccessTokens,
        digests: SecretDigests,
        throttle: PasswordThrottle,
        clock: Clock,
        account_tokens: ServiceAccountTokenService | None = None,
    ) -> None:
        self._accounts = accounts
        # The long-lived tokens' service: the servicer's token RPCs use it too.
        self.account_tokens = account_tokens
        self._tokens = tokens
        self._digests = digests
        self._throttle = throttle
        self._clock = clock

    async def create(
        self, name: str, *, caller: Caller, permissions: frozenset[ServiceAccountPermission] = frozenset()
    ) -> tuple[ServiceAccount, str]:
        """A new account and its secret, which is returned here once and never stored."""
        if not rules.SERVICE_ACCOUNT_NAME_PATTERN.fullmatch(name):
            raise InvalidArgument(
                [FieldViolation("name", "must be 3 to 64 characters of [a-z0-9._-], starting with a letter or digit")]
            )
        account = ServiceAccount(
            client_id=self._accounts.new_id(), name=name, created_at=self._clock.now(), permissions=permissions
        )
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        await self._accounts.add(account, self._digest(account.client_id, secret))
        log.info(
            "service account created",
            extra={
                "admin_id": caller.user_id,
                "client_id": account.client_id,
                "service_account": name,
                "permissions": sorted(permission.value for permission in permissions),
            },
        )
        return account, secret

    async def issue_token(self, client_id: str, secret: str, *, source: str) -> tuple[str, datetime]:
        """An access token for the account if the secret is right; one answer for an unknown id
        and a wrong secret, both throttled per client id and source."""
        if not client_id:
            raise InvalidArgument([FieldViolation("client_id", "is required")])
        if not rules.is_id(client_id):
            raise InvalidArgument([FieldViolation("client_id", "must be 24 lower-case hexadecimal digits")])
        if not secret:
            raise InvalidArgument([FieldViolation("client_secret", "is required")])
        if len(secret) > _SECRET_MAX_LENGTH:
            raise InvalidArgument([FieldViolation("client_secret", f"must be at most {_SECRET_MAX_LENGTH} characters")])
        reservation = await self._throttle.reserve(f"service-account:{client_id}", source)
        stored = await self._accounts.secret_digest(client_id)
        # Under the digest root the stored digest names.
        if stored is None or not self._digests.matches(stored, "service-account-secret", client_id, secret):
            await self._throttle.failed(reservation)
            log.info("service account secret refused", extra={"client_id": client_id})
            raise InvalidCredentials()
        await self._throttle.succeeded(reservation)
        token, expires_at = self._tokens.issue_service(client_id)
        log.info("service token issued", extra={"client_id": client_id})
        return token, expires_at

    async def caller_of(self, access_token: str) -> Caller:
        """The machine caller a service-account token speaks for, if the account still exists."""
        if looks_like_token(access_token):
            if self.account_tokens is None:
                raise Unauthenticated("invalid access token")
            return await self.account_tokens.caller_of(access_token)
        client_id = await self._tokens.verify_service(access_token)
        account = await self._accounts.get(client_id)
        if account is None:
            raise Unauthenticated("access token revoked")
        return machine_caller(account)

    async def list(self, page_size: int, page_token: str) -> tuple[list[ServiceAccount], str]:
        """A page of accounts, oldest first, and the token of the next page ("" after the last)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument([FieldViolation("page_size", f"must be 0 to {MAX_PAGE_SIZE}")])
        limit = page_size or DEFAULT_PAGE_SIZE
        position = _PAGES.decode(page_token)
        accounts = await self._accounts.list_after(None if position is None else position.hex(), limit + 1)
        if len(accounts) <= limit:
            return accounts, ""
        return accounts[:limit], _PAGES.encode(bytes.fromhex(accounts[limit - 1].client_id))

    async def delete(self, client_id: str, *, caller: Caller) -> None:
        rules.validate_user_id(client_id, "client_id")
        if not await self._accounts.delete(client_id):
            raise ServiceAccountNotFound()
        log.info("service account deleted", extra={"admin_id": caller.user_id, "client_id": client_id})

    def _digest(self, client_id: str, secret: str) -> str:
        return self._digests.digest("service-account-secret", client_id, secret)


def machine_caller(account: ServiceAccount) -> Caller:
    """Who a token of ``account`` speaks for, whichever kind of token: its machine caller, with the
    permissions as just read."""
    return Caller(
        machine=rules.service_account_machine(account.name),
        service_account_id=account.client_id,
        permissions=account.permissions,
    )
