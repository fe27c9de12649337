"""Keys for secrets kept in the database, derived from the key-encryption key.

A copy of the database alone must reveal no usable code or token. So every
code or token the database keeps is a keyed digest (HMAC-SHA256) bound to its
purpose and to its user or session, and mail bodies waiting in the outbox are
sealed (AES-256-GCM). Each purpose has its own key, derived from
``USERS_KEY_ENCRYPTION_KEY`` with HKDF-SHA256 (RFC 5869), so no key serves two
purposes and none of them is the key-encryption key itself.

Services see none of this: they ask :class:`users_grpc.ports.SecretDigests`
for digests; only :class:`users_grpc.repository.MongoOutbox` seals and opens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import get_args

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from users_grpc.ports import DigestPurpose

_NONCE_BYTES = 12


def derive_key(key_encryption_key: bytes, purpose: str) -> bytes:
    """A 256-bit key for one purpose; the same inputs give the same key on every replica."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"users-grpc/v1/{purpose}".encode()).derive(
        key_encryption_key
    )


class SecretsAtRest:
    """Keyed digests (:class:`users_grpc.ports.SecretDigests`) and sealing of outbox mail bodies."""

    def __init__(self, key_encryption_key: bytes) -> None:
        if len(key_encryption_key) != 32:
            raise ValueError("the key-encryption key must be 32 bytes")
        self._digest_keys = {
            purpose: derive_key(key_encryption_key, f"digest/{purpose}") for purpose in get_args(DigestPurpose)
        }
        self._mail = AESGCM(derive_key(key_encryption_key, "seal/outbox-mail-body"))

    def digest(self, purpose: DigestPurpose, subject: str, secret: str) -> str:
        """HMAC-SHA256 of ``secret`` under the purpose's key, bound to ``subject``; 64 hex digits."""
        if "\0" in subject:
            raise ValueError("a subject holds no NUL")
        message = f"{subject}\0{secret}".encode()
        return hmac.new(self._digest_keys[purpose], message, hashlib.sha256).hexdigest()

    def seal_mail_body(self, body: str, associated_data: bytes) -> bytes:
        """The body, encrypted and authenticated together with ``associated_data`` (what it belongs to)."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._mail.encrypt(nonce, body.encode(), associated_data)

    def open_mail_body(self, sealed: bytes, associated_data: bytes) -> str:
        """The body; raises ``cryptography.exceptions.InvalidTag`` if it or its associated data were changed."""
        return self._mail.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated_data).decode()
