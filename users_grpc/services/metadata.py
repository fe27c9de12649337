"""User metadata (SetUserMetadata, GetUserMetadata, ListUserMetadata, DeleteUserMetadata): who may
touch which scope, the bounds, and conditional writes.

The access rule admits the user themself, admins and machine callers; the scope decides the rest
here, as CreateUser decides who may ask for ROLE_ADMIN: the user reads and writes only the self
scope; admins read and write both; machine callers read both and write only if they are listed
among the writers (USERS_METADATA_WRITERS). Machine callers are read-only everywhere else in the
contract, and service accounts have no roles, so writing is a grant of its own.

A write reads the user's entries, checks the etag and the bounds on the whole new set, and
stores it in one update conditional on the set's revision: the entries, their bounds and the
change of the feed land together or not at all. If another write came first, it reads again
and decides again, so a stale etag always ends ABORTED, and an unconditional write is never lost
to a concurrent one (each applies to what the other left).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from users_grpc.domain import rules
from users_grpc.domain.errors import (
    FieldViolation,
    InvalidArgument,
    MetadataEtagMismatch,
    MetadataNotFound,
    NotFound,
    PermissionDenied,
    StorageUnavailable,
)
from users_grpc.domain.metadata import (
    MetadataEntry,
    MetadataKey,
    MetadataScope,
    StoredMetadata,
    check_scope_bounds,
    validate_etag,
    validate_key,
    validate_value,
)
from users_grpc.domain.model import Caller
from users_grpc.domain.ports import Clock, MetadataStore

log = logging.getLogger(__name__)

# Reads and conditional writes one call tries before giving up: each lost round means another
# write to the same user's metadata landed meanwhile.
_ROUNDS = 20


class MetadataService:
    def __init__(self, *, store: MetadataStore, clock: Clock, writers: Iterable[str]) -> None:
        self._store = store
        self._clock = clock
        self._writers = frozenset(writers)

    async def set(
        self, user_id: str, scope: MetadataScope | None, key: str, value: bytes, etag: str, *, caller: Caller
    ) -> MetadataEntry:
        scope = self._admit(user_id, scope, caller, write=True)
        validate_key(key)
        validate_value(value)
        validate_etag(etag)
        for _ in range(_ROUNDS):
            read = await self._read(user_id)
            _check_etag(_find(read.entries, scope, key), etag)
            entry = MetadataEntry(
                scope=scope, key=key, value=value, etag=os.urandom(12).hex(), updated_at=self._clock.now()
            )
            entries = _sorted((*(e for e in read.entries if (e.scope, e.key) != (scope, key)), entry))
            check_scope_bounds(entries, scope)
            if await self._store.replace_metadata(user_id, read, entries, MetadataKey(scope, key)):
                log.info("user metadata set", extra={"user_id": user_id, "scope": scope.value, "key": key})
                return entry
        raise StorageUnavailable("too many concurrent writes to this user's metadata; retry")

    async def get(self, user_id: str, scope: MetadataScope | None, key: str, *, caller: Caller) -> MetadataEntry:
        scope = self._admit(user_id, scope, caller, write=False)
        validate_key(key)
        entry = _find((await self._read(user_id)).entries, scope, key)
        if entry is None:
            raise MetadataNotFound()
        return entry

    async def list(self, user_id: str, scope: MetadataScope | None, *, caller: Caller) -> list[MetadataEntry]:
        """The entries of ``scope``; with None, of every scope ``caller`` may read."""
        if scope is None:
            readable = {MetadataScope.SELF} if _is_only_self(user_id, caller) else set(MetadataScope)
        else:
            readable = {self._admit(user_id, scope, caller, write=False)}
        rules.validate_user_id(user_id, "user_id")
        return [entry for entry in (await self._read(user_id)).entries if entry.scope in readable]

    async def delete(self, user_id: str, scope: MetadataScope | None, key: str, etag: str, *, caller: Caller) -> None:
        scope = self._admit(user_id, scope, caller, write=True)
        validate_key(key)
        validate_etag(etag)
        for _ in range(_ROUNDS):
            read = await self._read(user_id)
            entry = _find(read.entries, scope, key)
            if entry is None:
                if etag:
                    raise MetadataEtagMismatch()
                raise MetadataNotFound()
            _check_etag(entry, etag)
            remaining = tuple(e for e in read.entries if e is not entry)
            if await self._store.replace_metadata(user_id, read, remaining, MetadataKey(scope, key)):
                log.info("user metadata removed", extra={"user_id": user_id, "scope": scope.value, "key": key})
                return
        raise StorageUnavailable("too many concurrent writes to this user's metadata; retry")

    def _admit(self, user_id: str, scope: MetadataScope | None, caller: Caller, *, write: bool) -> MetadataScope:
        """The scope, if ``caller`` may read (or write) it on ``user_id``; else PermissionDenied.

        Checked before the request's other fields, so a refused caller learns nothing of them."""
        rules.validate_user_id(user_id, "user_id")
        if scope is None:
            raise InvalidArgument([FieldViolation("scope", "is required: METADATA_SCOPE_ADMIN or METADATA_SCOPE_SELF")])
        if caller.is_admin:
            return scope
        if caller.machine is not None:
            if write and caller.machine not in self._writers:
                raise PermissionDenied("this machine caller may read metadata, not write it (USERS_METADATA_WRITERS)")
            return scope
        if caller.user_id == user_id and scope is MetadataScope.SELF:
            return scope
        raise PermissionDenied()

    async def _read(self, user_id: str) -> StoredMetadata:
        read = await self._store.metadata_of(user_id)
        if read is None:
            raise NotFound()
        return read


def _is_only_self(user_id: str, caller: Caller) -> bool:
    if caller.is_admin or caller.machine is not None:
        return False
    if caller.user_id != user_id:
        raise PermissionDenied()
    return True


def _find(entries: tuple[MetadataEntry, ...], scope: MetadataScope, key: str) -> MetadataEntry | None:
    return next((entry for entry in entries if entry.scope is scope and entry.key == key), None)


def _check_etag(entry: MetadataEntry | None, etag: str) -> None:
    if etag and (entry is None or entry.etag != etag):
        raise MetadataEtagMismatch()


def _sorted(entries: Iterable[MetadataEntry]) -> tuple[MetadataEntry, ...]:
    return tuple(sorted(entries, key=lambda entry: (entry.scope.value, entry.key)))
