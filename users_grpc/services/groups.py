"""Groups: named sets of users that admins keep, that users see their own of, and that access tokens carry.

Writes are admin-only (access.py); every membership change reaches the change feed and, through
the audit interceptor, the audit trail. A user is in at most ``MAX_GROUPS_PER_USER`` groups, so the
``groups`` claim of their access token names every group they are in, by id (a rename changes no
token; a group deleted and made again under its name is not the old one).
"""

from __future__ import annotations

import logging

from users_grpc.domain import rules
from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.groups import (
    MAX_GROUPS_PER_USER,
    Group,
    GroupMember,
    GroupMemberNotFound,
    GroupNotFound,
    GroupRepository,
    group_name,
)
from users_grpc.domain.model import Caller
from users_grpc.domain.ports import Clock
from users_grpc.services.paging import PageTokens

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Memberships of deleted groups removed per housekeeping run (each one a change in the feed).
SWEEP_BATCH = 1000
# Opaque to callers: the last id (12 bytes) of the page, bound to the list (and, for members and a
# user's groups, to the group or user), so that a token of one list is refused by another.
_GROUP_PAGES = PageTokens(position_bytes=12, list_name="users.v1.ListGroups")
_MEMBER_PAGES = PageTokens(position_bytes=12, list_name="users.v1.ListGroupMembers")
_USER_GROUP_PAGES = PageTokens(position_bytes=12, list_name="users.v1.ListUserGroups")


class GroupService:
    def __init__(self, *, groups: GroupRepository, clock: Clock) -> None:
        self._groups = groups
        self._clock = clock

    async def create(self, name: str, *, caller: Caller) -> Group:
        now = self._clock.now()
        group = Group(id=self._groups.new_id(), name=group_name(name), created_at=now, updated_at=now)
        await self._groups.add(group)
        log.info("group created", extra={"admin_id": caller.user_id, "group_id": group.id})
        return group

    async def rename(self, group_id: str, name: str) -> Group:
        rules.validate_user_id(group_id, "group_id")
        renamed = await self._groups.rename(group_id, group_name(name), self._clock.now())
        if renamed is None:
            raise GroupNotFound()
        return renamed

    async def delete(self, group_id: str, *, caller: Caller) -> None:
        """The group is gone at once; housekeeping removes its memberships (:meth:`sweep_deleted`)."""
        rules.validate_user_id(group_id, "group_id")
        if not await self._groups.mark_deleted(group_id, self._clock.now()):
            raise GroupNotFound()
        log.info("group deleted", extra={"admin_id": caller.user_id, "group_id": group_id})

    async def list_groups(self, page_size: int, page_token: str) -> tuple[list[Group], str]:
        limit = _limit(page_size)
        position = _GROUP_PAGES.decode(page_token)
        groups = await self._groups.list_after(_id_at(position), limit + 1)
        if len(groups) <= limit:
            return groups, ""
        return groups[:limit], _GROUP_PAGES.encode(bytes.fromhex(groups[limit - 1].id))

    async def add_member(self, group_id: str, user_id: str) -> GroupMember:
        rules.validate_user_id(group_id, "group_id")
        rules.validate_user_id(user_id, "user_id")
        if await self._groups.get(group_id) is None:
            raise GroupNotFound()
        member = GroupMember(group_id=group_id, user_id=user_id, created_at=self._clock.now())
        await self._groups.add_member(member, MAX_GROUPS_PER_USER)
        return member

    async def remove_member(self, group_id: str, user_id: str) -> None:
        rules.validate_user_id(group_id, "group_id")
        rules.validate_user_id(user_id, "user_id")
        if await self._groups.get(group_id) is None:
            raise GroupNotFound()
        if not await self._groups.remove_member(group_id, user_id, self._clock.now()):
            raise GroupMemberNotFound()

    async def members(self, group_id: str, page_size: int, page_token: str) -> tuple[list[GroupMember], str]:
        rules.validate_user_id(group_id, "group_id")
        limit = _limit(page_size)
        bound = bytes.fromhex(group_id)
        position = _MEMBER_PAGES.decode(page_token, bound)
        if await self._groups.get(group_id) is None:
            raise GroupNotFound()
        members = await self._groups.members_after(group_id, _id_at(position), limit + 1)
        if len(members) <= limit:
            return members, ""
        return members[:limit], _MEMBER_PAGES.encode(bytes.fromhex(members[limit - 1].user_id), bound)

    async def groups_of(self, user_id: str, page_size: int, page_token: str) -> tuple[list[Group], str]:
        """A page of the user's groups; a page may hold fewer than asked when a group on it is being
        deleted (its membership not swept yet), and the next token still goes on from there."""
        rules.validate_user_id(user_id, "user_id")
        limit = _limit(page_size)
        bound = bytes.fromhex(user_id)
        position = _USER_GROUP_PAGES.decode(page_token, bound)
        memberships = await self._groups.memberships_after(user_id, _id_at(position), limit + 1)
        groups = await self._groups.get_many([m.group_id for m in memberships[:limit]])
        if len(memberships) <= limit:
            return groups, ""
        return groups, _USER_GROUP_PAGES.encode(bytes.fromhex(memberships[limit - 1].group_id), bound)

    async def token_groups(self, user_id: str) -> tuple[str, ...]:
        """The ids of every live group the user is in, for the ``groups`` claim (at most the cap)."""
        memberships = await self._groups.memberships_after(user_id, None, MAX_GROUPS_PER_USER)
        if not memberships:
            return ()
        return tuple(group.id for group in await self._groups.get_many([m.group_id for m in memberships]))

    async def sweep_deleted(self) -> int:
        """Remove a batch of deleted groups' memberships (housekeeping); how many."""
        return await self._groups.sweep_deleted_groups(SWEEP_BATCH)


def _limit(page_size: int) -> int:
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument([FieldViolation("page_size", f"must be 0 to {MAX_PAGE_SIZE}")])
    return page_size or DEFAULT_PAGE_SIZE


def _id_at(position: bytes | None) -> str | None:
    return None if position is None else position.hex()
