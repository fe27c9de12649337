"""The metadata bounds (users_grpc/domain/metadata.py) at their edges, without a server; the e2e
test (tests/e2e/test_metadata.py) holds the service to them through real channels."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from users_grpc.domain.errors import InvalidArgument
from users_grpc.domain.metadata import (
    MAX_ENTRIES_PER_SCOPE,
    MAX_SCOPE_BYTES,
    MetadataEntry,
    MetadataScope,
    check_scope_bounds,
    validate_etag,
    validate_key,
    validate_value,
)

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def entry(key: str, size: int, scope: MetadataScope = MetadataScope.ADMIN) -> MetadataEntry:
    return MetadataEntry(scope=scope, key=key, value=b"x" * size, etag="0" * 24, updated_at=NOW)


def fields(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [violation.field for violation in error.value.violations]


@pytest.mark.parametrize("key", ["a", "A9", "billing.customer_id", "ns:key-1", "9" * 64])
def test_well_formed_keys_pass(key: str) -> None:
    validate_key(key)


@pytest.mark.parametrize("key", ["", ".a", "-a", "_a", "a b", "a/b", "a\x00", "é", "a" * 65])
def test_malformed_keys_name_the_field(key: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_key(key, "metadata.key")
    assert fields(raised) == ["metadata.key"]


def test_values_up_to_4096_bytes() -> None:
    validate_value(b"x" * 4096)
    with pytest.raises(InvalidArgument) as raised:
        validate_value(b"x" * 4097)
    assert fields(raised) == ["value"]


def test_etags_are_24_lower_hex_digits_or_none() -> None:
    validate_etag("")
    validate_etag("0123456789abcdef01234567")
    for bad in ("0123456789ABCDEF01234567", "0" * 23, "0" * 25, "g" * 24):
        with pytest.raises(InvalidArgument):
            validate_etag(bad)


def test_each_scope_holds_64_entries_and_16384_bytes_of_its_own() -> None:
    full = tuple(entry(f"k{n:02d}", 0) for n in range(MAX_ENTRIES_PER_SCOPE))
    other = tuple(entry(f"k{n:02d}", 0, MetadataScope.SELF) for n in range(MAX_ENTRIES_PER_SCOPE))
    check_scope_bounds((*full, *other), MetadataScope.ADMIN)
    with pytest.raises(InvalidArgument) as raised:
        check_scope_bounds((*full, entry("one-more", 0)), MetadataScope.ADMIN)
    assert fields(raised) == ["key"]
    # 16384 bytes of keys and values exactly: one key of 4 bytes, 16380 of values in four entries.
    exact = (entry("a", 4095), entry("b", 4095), entry("c", 4095), entry("d", 4095))
    assert sum(e.size for e in exact) == MAX_SCOPE_BYTES
    check_scope_bounds(exact, MetadataScope.ADMIN)
    with pytest.raises(InvalidArgument) as raised:
        check_scope_bounds((*exact, entry("e", 0)), MetadataScope.ADMIN)
    assert fields(raised) == ["value"]
    # The other scope's size is not counted.
    check_scope_bounds((*exact, entry("e", 4095, MetadataScope.SELF)), MetadataScope.ADMIN)
