"""The service-account token format (users_grpc/domain/service_account_tokens.py): recognised by
its prefix, read by fixed lengths (the secret's alphabet holds "_"), anything else refused."""

from __future__ import annotations

import secrets

import pytest

from users_grpc.domain.service_account_tokens import SECRET_BYTES, TokenParts, compose, looks_like_token, parse
from users_grpc.services.tokens import is_service_token

ACCOUNT, TOKEN = "0123456789abcdef01234567", "89abcdef0123456789abcdef"


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
