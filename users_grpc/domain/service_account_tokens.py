"""Service-account tokens: long-lived, revocable bearer tokens of a service account, for callers
that hold one static credential for months (an identity provider's SCIM connection).

A token reads ``usat_<client id>_<token id>_<secret>``: the prefix lets secret scanners (GitHub's,
gitleaks) find a leaked one, as GitHub's ``ghp_`` does; the two ids find its record with one read
of the account by ``_id``; the secret is 256 random bits in URL-safe base64. Only a keyed digest of
the secret is kept. The record lives inside its service account's document (at most
MAX_TOKENS_PER_ACCOUNT), so deleting the account deletes its tokens in the same write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from users_grpc.domain.model import ServiceAccount

PREFIX = "usat_"
# An IdP needs one; rotating it needs two at once; a few more for other machines. It also bounds the
# account document, which every call with one of its tokens reads.
MAX_TOKENS_PER_ACCOUNT = 10
SECRET_BYTES = 32
# Fixed lengths: 24 hex digits per id, 43 characters of unpadded base64url for 32 bytes. The
# secret's alphabet holds "_", so the parts are told apart by length, never by splitting.
_FORMAT = re.compile(r"usat_([0-9a-f]{24})_([0-9a-f]{24})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True, kw_only=True)
class ServiceAccountToken:
    """A token's record, without its secret or digest (which never leave the service)."""

    id: str
    service_account_id: str
    display_name: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


class TokenParts(NamedTuple):
    service_account_id: str
    token_id: str
    secret: str


def looks_like_token(bearer: str) -> bool:
    """Whether a bearer claims to be a service-account token: only to choose how to check it."""
    return bearer.startswith(PREFIX)


def compose(service_account_id: str, token_id: str, secret: str) -> str:
    return f"{PREFIX}{service_account_id}_{token_id}_{secret}"


def parse(bearer: str) -> TokenParts | None:
    """The parts of a well-formed token; None for anything else."""
    match = _FORMAT.fullmatch(bearer)
    return None if match is None else TokenParts(*match.groups())


@dataclass(frozen=True, kw_only=True)
class TokenHolder:
    """A service account as a call with one of its tokens reads it: the account, and the token's
    record and digest if the account holds a token of that id (None: unknown or revoked)."""

    account: ServiceAccount
    token: ServiceAccountToken | None
    digest: str | None
