"""Keys derived from the key-encryption key: one per purpose, digests bound to their subject,
sealed mail bodies bound to their mail."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.exceptions import InvalidTag

from users_grpc.adapters.secrets_at_rest import SecretsAtRest, derive_key

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


def versioned(*later: tuple[int, bytes, datetime | None]) -> SecretsAtRest:
    keys = SecretsAtRest(KEK)
    keys.use_digest_roots({0: (KEK, None), **{version: (root, since) for version, root, since in later}})
    return keys


def test_new_digests_use_the_newest_root_in_use_and_name_it() -> None:
    root = os.urandom(32)
    past = datetime.now(UTC) - timedelta(seconds=1)
    keys = versioned((1, root, past))
    digest = keys.digest("activation-code", USER, "123456")
    assert digest.startswith("1:")
    assert digest.removeprefix("1:") == SecretsAtRest(root).digest("activation-code", USER, "123456")
    assert SecretsAtRest(KEK).digest("activation-code", USER, "123456") not in digest  # root 0 keys it not
    assert keys.matches(digest, "activation-code", USER, "123456")
    assert not keys.matches(digest, "activation-code", USER, "123457")


def test_a_digest_made_under_an_older_root_still_matches_under_it() -> None:
    before = SecretsAtRest(KEK).digest("refresh-token", USER, "token")  # bare: root 0, as before versions
    keys = versioned((1, os.urandom(32), datetime.now(UTC) - timedelta(seconds=1)))
    assert keys.matches(before, "refresh-token", USER, "token")
    assert keys.digests("refresh-token", USER, "token") == [keys.digest("refresh-token", USER, "token"), before]


def test_a_root_not_yet_in_use_keys_no_new_digest_but_is_known() -> None:
    soon = os.urandom(32)
    keys = versioned((1, soon, datetime.now(UTC) + timedelta(hours=1)))
    assert keys.current_digest_root == 0
    assert keys.digest("recovery-code", USER, "code") == SecretsAtRest(KEK).digest("recovery-code", USER, "code")
    # Made on a replica whose clock is ahead: this one checks it all the same.
    ahead = "1:" + SecretsAtRest(soon).digest("recovery-code", USER, "code")
    assert keys.matches(ahead, "recovery-code", USER, "code")


@pytest.mark.parametrize("prefix", ["2:", "0:", ":", "x:", "-1:", "01:"])
def test_a_digest_naming_no_root_loaded_matches_nothing(prefix: str) -> None:
    keys = versioned((1, os.urandom(32), None))
    bare = keys.digests("activation-code", USER, "123456")[-1]
    assert not keys.matches(prefix + bare, "activation-code", USER, "123456")
