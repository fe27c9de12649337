"""Keys for secrets kept in the database, derived from the key-encryption key.

A copy of the database alone must reveal no usable code or token. So every
code or token the database keeps is a keyed digest (HMAC-SHA256) bound to its
purpose and to its user or session, and mail bodies waiting in the outbox are
sealed (AES-256-GCM). Each purpose has its own key, derived from
``USERS_KEY_ENCRYPTION_KEY`` with HKDF-SHA256 (RFC 5869), so no key serves two
purposes and none of them is the key-encryption key itself.

Rotating the key-encryption key (``users-grpc keys rewrap``) re-seals mail bodies; the digest
keys stay as they are (see :class:`SecretsAtRest`), so stored digests keep matching.

Services see none of this: they ask :class:`users_grpc.ports.SecretDigests`
for digests; only :class:`users_grpc.mongo.outbox.MongoOutbox` seals and opens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import get_args

from cryptography.exceptions import InvalidTag
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
    """Keyed digests (:class:`users_grpc.ports.SecretDigests`) and sealing of outbox mail bodies.

    Mail bodies are sealed under a key derived from the current key-encryption key and open
    under the old ones too (``old_keys``, during a rotation). Digests cannot be re-made without
    the secrets they hide, so their keys come from a *digest root* that outlives rotations: the
    key-encryption key the database was set up with, kept in the database sealed under the
    current one (:func:`users_grpc.rewrap.load_digest_root`). Until it is loaded, the current key
    serves as the root.
    """

    def __init__(self, key_encryption_key: bytes, old_keys: tuple[bytes, ...] = ()) -> None:
        if any(len(key) != 32 for key in (key_encryption_key, *old_keys)):
            raise ValueError("the key-encryption key must be 32 bytes")
        self.use_digest_root(key_encryption_key)
        self._mail = [
            AESGCM(derive_key(key, "seal/outbox-mail-body"))
            for key in (key_encryption_key, *(k for k in old_keys if k != key_encryption_key))
        ]

    def use_digest_root(self, root: bytes) -> None:
        """Derive the digest keys from ``root`` (the database's digest root) from now on."""
        self._digest_keys = {purpose: derive_key(root, f"digest/{purpose}") for purpose in get_args(DigestPurpose)}

    def digest(self, purpose: DigestPurpose, subject: str, secret: str) -> str:
        """HMAC-SHA256 of ``secret`` under the purpose's key, bound to ``subject``; 64 hex digits."""
        if "\0" in subject:
            raise ValueError("a subject holds no NUL")
        message = f"{subject}\0{secret}".encode()
        return hmac.new(self._digest_keys[purpose], message, hashlib.sha256).hexdigest()

    def seal_mail_body(self, body: str, associated_data: bytes) -> bytes:
        """The body, encrypted and authenticated together with ``associated_data`` (what it belongs to)."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._mail[0].encrypt(nonce, body.encode(), associated_data)

    def open_mail_body(self, sealed: bytes, associated_data: bytes) -> str:
        """The body; raises ``cryptography.exceptions.InvalidTag`` if it or its associated data were
        changed, or no key (current or old) opens it."""
        return self._opened_mail_body(sealed, associated_data)[1]

    def reseal_mail_body(self, sealed: bytes, associated_data: bytes) -> bytes | None:
        """The body sealed again under the current key; None if it already is (``InvalidTag`` as above)."""
        index, body = self._opened_mail_body(sealed, associated_data)
        return None if index == 0 else self.seal_mail_body(body, associated_data)

    def _opened_mail_body(self, sealed: bytes, associated_data: bytes) -> tuple[int, str]:
        for index, aead in enumerate(self._mail):
            try:
                return index, aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated_data).decode()
            except InvalidTag:
                continue
        raise InvalidTag()
