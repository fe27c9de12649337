"""Keys for secrets kept in the database, derived from the key-encryption key.

A copy of the database alone must reveal no usable code or token. So every
code or token the database keeps is a keyed digest (HMAC-SHA256) bound to its
purpose and to its user or session, and mail bodies waiting in the outbox are
sealed (AES-256-GCM). Each purpose has its own key, derived from
``USERS_KEY_ENCRYPTION_KEY`` with HKDF-SHA256 (RFC 5869), so no key serves two
purposes and none of them is the key-encryption key itself.

Rotating the key-encryption key (``users-grpc keys rewrap``) re-seals mail bodies; the digest
keys come from *digest roots* (see :class:`SecretsAtRest`), which ``users-grpc keys
rotate-digest-root`` replaces for new digests while stored ones keep matching under theirs.

Services see none of this: they ask :class:`users_grpc.domain.ports.SecretDigests`
for digests; only :class:`users_grpc.adapters.mongo.outbox.MongoOutbox` seals and opens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import get_args

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from users_grpc.domain.ports import DigestPurpose

_NONCE_BYTES = 12


def derive_key(key_encryption_key: bytes, purpose: str) -> bytes:
    """A 256-bit key for one purpose; the same inputs give the same key on every replica."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"users-grpc/v1/{purpose}".encode()).derive(
        key_encryption_key
    )


class SecretsAtRest:
    """Keyed digests (:class:`users_grpc.domain.ports.SecretDigests`) and sealing of outbox mail bodies.

    Mail bodies are sealed under a key derived from the current key-encryption key and open
    under the old ones too (``old_keys``, during a rotation). Digests cannot be re-made without
    the secrets they hide, so their keys come from versioned *digest roots*, kept in the database
    sealed under the key-encryption key (:func:`users_grpc.ops.rewrap.load_digest_roots`). Version 0
    is the key-encryption key the database was set up with; each later one is 256 random bits,
    started by ``users-grpc keys rotate-digest-root``. New digests use the newest root whose
    ``in_use_from`` has passed, and name its version (``<version>:<64 hex digits>``; version 0's
    are the bare 64 hex digits of before); a stored digest is checked under the root it names.
    Until the roots are loaded, the current key serves as root 0.

    ``in_use_from`` is compared with the wall clock, not the service's clock: it coordinates
    processes (the command that starts a root and every replica), which share only that.
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
        """Derive the digest keys from ``root`` alone, as version 0, from now on."""
        self.use_digest_roots({0: (root, None)})

    def use_digest_roots(self, roots: Mapping[int, tuple[bytes, datetime | None]]) -> None:
        """Derive the digest keys from these roots from now on: version -> (root, in use from)."""
        if 0 not in roots:
            raise ValueError("root 0 is needed: it keys every digest made before roots were versioned")
        self._digest_keys = {
            version: {purpose: derive_key(root, f"digest/{purpose}") for purpose in get_args(DigestPurpose)}
            for version, (root, _) in roots.items()
        }
        # Newest first: the current root is the first whose time has come.
        self._in_use_from = sorted(
            ((version, in_use_from) for version, (_, in_use_from) in roots.items()), key=lambda r: -r[0]
        )

    @property
    def digest_root_versions(self) -> list[int]:
        """The versions loaded, newest first."""
        return [version for version, _ in self._in_use_from]

    @property
    def current_digest_root(self) -> int:
        """The version new digests are made under."""
        now = datetime.now(UTC)
        return next(version for version, since in self._in_use_from if since is None or since <= now)

    def digest(self, purpose: DigestPurpose, subject: str, secret: str) -> str:
        """HMAC-SHA256 of ``secret`` under the current root's key for the purpose, bound to
        ``subject``: 64 hex digits, after ``<version>:`` for any root but 0."""
        return self._digest_under(self.current_digest_root, purpose, subject, secret)

    def digests(self, purpose: DigestPurpose, subject: str, secret: str) -> list[str]:
        """The digest under every root loaded, the current one first: what a stored digest of this
        secret may be, for a lookup by digest."""
        current = self.current_digest_root
        versions = [current, *(v for v in self.digest_root_versions if v != current)]
        return [self._digest_under(version, purpose, subject, secret) for version in versions]

    def matches(self, stored: str, purpose: DigestPurpose, subject: str, secret: str) -> bool:
        """Whether ``stored`` is the digest of ``secret``, under the root it names."""
        version_text, colon, _ = stored.rpartition(":")
        version = int(version_text) if colon and version_text.isascii() and version_text.isdigit() else 0
        if (colon and version == 0) or version not in self._digest_keys:
            return False  # a root this replica has not loaded (yet), or no digest of ours
        return hmac.compare_digest(stored, self._digest_under(version, purpose, subject, secret))

    def _digest_under(self, version: int, purpose: DigestPurpose, subject: str, secret: str) -> str:
        if "\0" in subject:
            raise ValueError("a subject holds no NUL")
        message = f"{subject}\0{secret}".encode()
        mac = hmac.new(self._digest_keys[version][purpose], message, hashlib.sha256).hexdigest()
        return mac if version == 0 else f"{version}:{mac}"

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
