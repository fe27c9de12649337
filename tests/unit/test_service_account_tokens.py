"""The service-account token format (users_grpc/domain/service_account_tokens.py): recognised by
its prefix, read by fixed lengths (the secret's alphabet holds "_"), anything else refused."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tests.support.fakes import FakeClock, FakeServiceAccountTokens
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.domain.errors import Unauthenticated
from users_grpc.domain.model import Caller, ServiceAccount
from users_grpc.domain.ports import DigestPurpose
from users_grpc.domain.service_account_tokens import SECRET_BYTES, TokenParts, compose, looks_like_token, parse
from users_grpc.services.service_account_tokens import ServiceAccountTokenService
from users_grpc.services.tokens import is_service_token

ACCOUNT, TOKEN = "0123456789abcdef01234567", "89abcdef0123456789abcdef"
_T = TypeVar("_T")


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


def test_a_composed_token_parses_back_whatever_its_secret_holds() -> None:
    for secret in (secrets.token_urlsafe(SECRET_BYTES), "_" * 43, "-" * 43):
        token = compose(ACCOUNT, TOKEN, secret)
        assert parse(token) == TokenParts(ACCOUNT, TOKEN, secret)
        assert looks_like_token(token)
        assert is_service_token(token)  # the access layer hands it to the service accounts


@pytest.mark.parametrize(
    "bearer",
    [
        "",
        "usat_",
        f"usat_{ACCOUNT}_{TOKEN}_{'a' * 42}",
        f"usat_{ACCOUNT}_{TOKEN}_{'a' * 44}",
        f"usat_{ACCOUNT.upper()}_{TOKEN}_{'a' * 43}",
        f"usat_{ACCOUNT}_{TOKEN}_{'a' * 42}=",
        f"usat_{ACCOUNT}{TOKEN}_{'a' * 44}",
        f"USAT_{ACCOUNT}_{TOKEN}_{'a' * 43}",
        f"usat_{ACCOUNT}_{TOKEN}_{'a' * 43}\n",
    ],
)
def test_anything_else_is_no_token(bearer: str) -> None:
    assert parse(bearer) is None


class CountingDigests(SecretsAtRest):
    """The real keyed digests, counting the comparisons made."""

    def __init__(self) -> None:
        super().__init__(os.urandom(32))
        self.comparisons = 0

    def matches(self, stored: str, purpose: DigestPurpose, subject: str, secret: str) -> bool:
        self.comparisons += 1
        return super().matches(stored, purpose, subject, secret)


def test_every_refused_token_costs_one_read_and_one_digest_and_gets_one_answer() -> None:
    """No oracle: an unknown account, an unknown or revoked token and a wrong secret are refused
    after the same work (one read of the account, one digest comparison) with the same error."""
    store, digests, clock = FakeServiceAccountTokens(), CountingDigests(), FakeClock()
    store.add_account(ServiceAccount(client_id=ACCOUNT, name="okta", created_at=clock.now()))
    service = ServiceAccountTokenService(accounts=store, digests=digests, clock=clock, max_lifetime=None)
    caller = Caller(user_id="f" * 24)
    kept, token = run(service.create(ACCOUNT, "kept", None, caller=caller))
    revoked, revoked_token = run(service.create(ACCOUNT, "revoked", None, caller=caller))
    run(service.revoke(ACCOUNT, revoked.id, caller=caller))
    secret = token[-43:]
    refused = [
        compose("e" * 24, kept.id, secret),  # no such account
        compose(ACCOUNT, "e" * 24, secret),  # no such token
        revoked_token,
        compose(ACCOUNT, kept.id, "A" * 43),  # a wrong secret
    ]
    for bearer in refused:
        before = digests.comparisons
        with pytest.raises(Unauthenticated) as raised:
            run(service.caller_of(bearer))
        assert str(raised.value) == "invalid access token"
        assert digests.comparisons == before + 1
    # The right one: the account's machine caller, its first use recorded (and no second, within the hour).
    assert run(service.caller_of(token)).service_account_id == ACCOUNT
    run(service.caller_of(token))
    assert store.uses == 1
