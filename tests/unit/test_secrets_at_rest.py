"""Keys derived from the key-encryption key: one per purpose, digests bound to their subject,
sealed mail bodies bound to their mail."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.exceptions import InvalidTag

from users_grpc.secrets_at_rest import SecretsAtRest, derive_key

KEK = os.urandom(32)
USER = "6b07d8aeee680be65577d511"


def test_a_digest_needs_the_key_and_is_bound_to_purpose_and_subject() -> None:
    keys = SecretsAtRest(KEK)
    digest = keys.digest("activation-code", USER, "123456")
    assert digest == SecretsAtRest(KEK).digest("activation-code", USER, "123456")  # every replica agrees
    assert len(digest) == 64
    others = {
        SecretsAtRest(os.urandom(32)).digest("activation-code", USER, "123456"),  # another key
        keys.digest("recovery-code", USER, "123456"),  # another purpose
        keys.digest("activation-code", "6b07d8aeee680be65577d512", "123456"),  # another user
        keys.digest("activation-code", USER, "123457"),
        hashlib.sha256(b"123456").hexdigest(),
    }
    assert digest not in others
    assert len(others) == 5


def test_each_purpose_has_its_own_key_none_of_them_the_key_encryption_key() -> None:
    derived = {derive_key(KEK, purpose) for purpose in ("digest/activation-code", "digest/recovery-code", "x")}
    assert len(derived) == 3
    assert KEK not in derived


def test_a_sealed_body_opens_only_with_its_own_associated_data() -> None:
    keys = SecretsAtRest(KEK)
    sealed = keys.seal_mail_body("your code is 123456", b"mail 1")
    assert b"123456" not in sealed
    assert keys.open_mail_body(sealed, b"mail 1") == "your code is 123456"
    with pytest.raises(InvalidTag):
        keys.open_mail_body(sealed, b"mail 2")
    with pytest.raises(InvalidTag):
        SecretsAtRest(os.urandom(32)).open_mail_body(sealed, b"mail 1")
    assert keys.seal_mail_body("same", b"m") != keys.seal_mail_body("same", b"m")  # fresh nonce each time


def test_the_key_encryption_key_must_be_256_bits() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecretsAtRest(b"short")
