"""Finding users (ListUsers) and changing their profiles (UpdateUser).

Pages are keyset pages over user ids, which grow with creation time: a page token names the
last id of its page, so a page deep in the list costs what the first one costs, and users
created or deleted meanwhile never shift the pages (nobody is shown twice; nobody who existed
before paging began is skipped). The token is bound to the filters it was made for.

An update is one conditional update; with an etag, its filter holds the version the etag
names, so of two callers holding the same etag exactly one wins (AIP-154).
"""

from __future__ import annotations

import logging

from users_grpc.domain import model, rules
from users_grpc.domain.errors import EtagMismatch, FieldViolation, InvalidArgument, NotFound, PermissionDenied
from users_grpc.domain.model import Caller, ProfileChanges, User, UserFilter
from users_grpc.domain.ports import Clock, UserDirectory
from users_grpc.services.paging import PageTokens

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A page token names the last user id (12 bytes) of its page, bound to the list's filters.
_PAGES = PageTokens(position_bytes=12, list_name="users.v1.ListUsers")


class DirectoryService:
    def __init__(self, *, users: UserDirectory, clock: Clock) -> None:
        self._users = users
        self._clock = clock

    async def list_users(
        self, filters: UserFilter, page_size: int, page_token: str, *, count: bool = False
    ) -> tuple[list[User], str, int | None]:
        """A page of users, oldest first; the token of the next page ("" after the last); and, if
        ``count``, how many users match the filters (else None: a count walks every match)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument([FieldViolation("page_size", f"must be 0 to {MAX_PAGE_SIZE}")])
        limit = page_size or DEFAULT_PAGE_SIZE
        position = _PAGES.decode(page_token, filters.fingerprint())
        after = None if position is None else position.hex()
        users = await self._users.list_users(filters, after, limit + 1)
        total = await self._users.count_users(filters) if count else None
        if len(users) <= limit:
            return users, "", total
        return users[:limit], _PAGES.encode(bytes.fromhex(users[limit - 1].id), filters.fingerprint()), total

    async def update_user(
        self, user_id: str, paths: list[str], changes: ProfileChanges, etag: str, *, caller: Caller | None = None
    ) -> User:
        rules.validate_user_id(user_id, "user_id")
        _validate_paths(paths)
        if changes.external_id is not None and caller is not None and not (caller.is_admin or caller.is_provisioner):
            # The IdP finds the account by it: a user who could set their own could pass for another.
            raise PermissionDenied()
        rules.validate_profile_changes(changes)
        expected = model.parse_etag(etag) if etag else None
        user = await self._users.update_profile(user_id, changes, expected, self._clock.now())
        if user is None:
            if expected is None or await self._users.get(user_id) is None:
                raise NotFound()
            raise EtagMismatch()
        log.info("user updated", extra={"user_id": user_id, "fields": sorted(set(paths))})
        return user


def _validate_paths(paths: list[str]) -> None:
    if not paths:
        raise InvalidArgument(
            [
                FieldViolation(
                    "update_mask", f"is required: name the fields to change ({', '.join(model.UPDATABLE_FIELDS)})"
                )
            ]
        )
    violations = [
        FieldViolation("update_mask", f"{path!r} cannot be changed here; only {', '.join(model.UPDATABLE_FIELDS)}")
        for path in dict.fromkeys(paths)
        if path not in model.UPDATABLE_FIELDS
    ]
    if violations:
        raise InvalidArgument(violations)
