"""Passkeys (WebAuthn credentials) as the services see them: no CBOR, COSE or JSON here.

The WebAuthn work itself (options, attestation and assertion checks) is py_webauthn's, behind the
:class:`~users_grpc.domain.ports.WebAuthn` port (users_grpc/adapters/webauthn_relying_party.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from users_grpc.domain.model import User

# A person has a phone, a laptop, a security key or two: ten is plenty, and it bounds the user document.
MAX_PASSKEYS = 10
DISPLAY_NAME_MAX_LENGTH = 64
DEFAULT_DISPLAY_NAME = "Passkey"
# A browser's RegistrationResponseJSON is a few KiB (an attestation certificate chain at most).
CREDENTIAL_JSON_MAX_LENGTH = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class StoredPasskey:
    """One registered credential. ``credential_id`` and ``public_key`` never leave the service."""

    id: str
    credential_id: bytes
    public_key: bytes
    sign_count: int
    display_name: str
    created_at: datetime
    last_used_at: datetime | None
    aaguid: str
    backup_eligible: bool
    backed_up: bool
    transports: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class PasskeyHolder:
    """A user with what passkeys need of the account."""

    user: User
    # The WebAuthn user handle: random, made at the first registration; None before it.
    user_handle: bytes | None
    password_set: bool
    totp_enabled: bool
    recovery_codes_remaining: int
    passkeys: tuple[StoredPasskey, ...]

    def passkey(self, passkey_id: str) -> StoredPasskey | None:
        return next((p for p in self.passkeys if p.id == passkey_id), None)

    def by_credential(self, credential_id: bytes) -> StoredPasskey | None:
        return next((p for p in self.passkeys if p.credential_id == credential_id), None)


class CeremonyPurpose(enum.Enum):
    """What a challenge was issued for; a ceremony serves that purpose only. Values are stored."""

    REGISTRATION = "registration"
    SIGN_IN = "sign_in"
    SECOND_FACTOR = "second_factor"


@dataclass(frozen=True, kw_only=True)
class Ceremony:
    """A challenge issued and not yet answered: single-use, bound to its purpose and user."""

    id: str
    purpose: CeremonyPurpose
    # The user it was issued to or for; None for a usernameless sign-in or an unknown identifier.
    user_id: str | None
    challenge: bytes
    expires_at: datetime


@dataclass(frozen=True, kw_only=True)
class NewCredential:
    """What a verified registration response yields."""

    credential_id: bytes
    public_key: bytes
    sign_count: int
    aaguid: str
    backup_eligible: bool
    backed_up: bool
    transports: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class AssertionClaim:
    """What an assertion says of itself before it is verified: which credential, which user handle."""

    credential_id: bytes
    user_handle: bytes | None


@dataclass(frozen=True, kw_only=True)
class VerifiedAssertion:
    sign_count: int
    backed_up: bool


@dataclass(frozen=True, kw_only=True)
class AllowedCredential:
    credential_id: bytes
    transports: tuple[str, ...]


class Removal(enum.Enum):
    REMOVED = "removed"
    NOT_FOUND = "not found"
    LAST_SIGN_IN_METHOD = "last sign-in method"


def counter_regressed(stored: int, presented: int) -> bool:
    """WebAuthn §6.1.1: a sign count that does not grow, where either side keeps one (non-zero),
    means two authenticators may hold the credential. Both zero: the authenticator keeps none."""
    return (stored != 0 or presented != 0) and presented <= stored
