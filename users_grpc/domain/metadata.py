"""User metadata: key/value entries other services keep on a user, in two scopes, and their bounds.

The bounds are part of the contract (protos/users/v1/metadata.proto), not settings: a client
knows them without asking the deployment, and every replica applies the same ones. They hold
per user *and scope*, so that a user filling their own scope never crowds out the admin scope.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

from users_grpc.domain.errors import FieldViolation, InvalidArgument

MAX_KEY_LENGTH = 64
MAX_VALUE_BYTES = 4096
MAX_ENTRIES_PER_SCOPE = 64
# Keys and values together (UTF-8 bytes of the keys): a user document stays small whatever is stored.
MAX_SCOPE_BYTES = 16384

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# An etag is the hex of a 12-byte id made for each write (never reused, unlike a counter that
# would start again after a removal).
_ETAG = re.compile(r"[0-9a-f]{24}")


class MetadataScope(enum.Enum):
    """Who reads and writes an entry; the value is what the database stores, so never change one."""

    ADMIN = "admin"  # admins and machine callers; never the user
    SELF = "self"  # the user too


@dataclass(frozen=True, kw_only=True)
class MetadataEntry:
    scope: MetadataScope
    key: str
    value: bytes
    etag: str
    updated_at: datetime

    @property
    def size(self) -> int:
        return len(self.key.encode()) + len(self.value)


@dataclass(frozen=True)
class MetadataKey:
    scope: MetadataScope
    key: str


@dataclass(frozen=True, kw_only=True)
class MetadataFilter:
    """ListUsers' users with an entry of ``scope`` and ``key``; with ``value`` None, any value."""

    scope: MetadataScope
    key: str
    value: bytes | None = None


def validate_key(key: str, field: str = "key") -> None:
    if not key:
        raise InvalidArgument([FieldViolation(field, "is required")])
    if len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    f"must be 1 to {MAX_KEY_LENGTH} characters of [A-Za-z0-9._:-], starting with a letter or digit",
                )
            ]
        )


def validate_value(value: bytes, field: str = "value") -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument([FieldViolation(field, f"must be at most {MAX_VALUE_BYTES} bytes, not {len(value)}")])


def validate_etag(etag: str) -> None:
    if etag and not _ETAG.fullmatch(etag):
        raise InvalidArgument([FieldViolation("etag", "is not an etag of a metadata entry")])


def check_scope_bounds(entries: tuple[MetadataEntry, ...], scope: MetadataScope) -> None:
    """INVALID_ARGUMENT if ``entries`` (a user's, after a write) hold more in ``scope`` than it may."""
    in_scope = [entry for entry in entries if entry.scope is scope]
    if len(in_scope) > MAX_ENTRIES_PER_SCOPE:
        raise InvalidArgument(
            [
                FieldViolation(
                    "key", f"the user has {MAX_ENTRIES_PER_SCOPE} entries in this scope, the most it may: remove one"
                )
            ]
        )
    size = sum(entry.size for entry in in_scope)
    if size > MAX_SCOPE_BYTES:
        raise InvalidArgument(
            [
                FieldViolation(
                    "value",
                    f"the scope's keys and values would take {size} bytes, over the {MAX_SCOPE_BYTES} it may hold",
                )
            ]
        )


@dataclass(frozen=True)
class StoredMetadata:
    """A user's entries as read, and the revision of the set they were read at: a write applies
    only at that revision, so two writers that read the same set cannot both write it."""

    entries: tuple[MetadataEntry, ...]
    revision: int
