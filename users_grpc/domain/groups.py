"""Groups: a named set of users, what a group's name must be, and the store the service needs.

A membership is a document of its own (a user id and a group id), never an array in the group or
the user: a group of a million users stays one small document, and "the groups of a user" and
"the members of a group" are each one indexed query (adapters/mongo/groups.py).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from users_grpc.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from users_grpc.domain.rules import _fold, _has_control_characters

GROUP_NAME_MAX_LENGTH = 64
# A user is in at most this many groups: the access token names every one (a 24-character id
# each, about 1 kB at the cap), so the claim is bounded and never cut short, and removing a
# deleted user's memberships is one bounded query.
MAX_GROUPS_PER_USER = 32


class GroupNotFound(NotFound):
    reason = "GROUP_NOT_FOUND"
    message = "group not found"


class GroupMemberNotFound(NotFound):
    reason = "GROUP_MEMBER_NOT_FOUND"
    message = "the user is not a member of the group"


class TooManyGroups(FailedPrecondition):
    reason = "TOO_MANY_GROUPS"
    message = f"the user is in {MAX_GROUPS_PER_USER} groups, as many as a user may be in"


@dataclass(frozen=True, kw_only=True)
class Group:
    id: str
    name: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, kw_only=True)
class GroupMember:
    group_id: str
    user_id: str
    created_at: datetime


def group_name(name: str, field: str = "name") -> str:
    """The name as stored (stripped, NFC), or INVALID_ARGUMENT."""
    stripped = unicodedata.normalize("NFC", name.strip())
    if not stripped:
        raise InvalidArgument([FieldViolation(field, "is required")])
    if len(stripped) > GROUP_NAME_MAX_LENGTH:
        raise InvalidArgument([FieldViolation(field, f"must be at most {GROUP_NAME_MAX_LENGTH} characters")])
    if _has_control_characters(stripped):
        raise InvalidArgument([FieldViolation(field, "must not contain control, format or line-break characters")])
    return stripped


def group_name_key(name: str) -> str:
    """The form under which names are unique: NFKC and case folding, as usernames (rules.identifier_key)."""
    return _fold(unicodedata.normalize("NFKC", name))


class GroupRepository(Protocol):
    """The groups and their memberships (adapters/mongo/groups.py)."""

    def new_id(self) -> str: ...

    async def add(self, group: Group) -> None:
        """AlreadyExists("name") if another group has the name's key."""

    async def get(self, group_id: str) -> Group | None:
        """The group, unless it does not exist or is being deleted."""

    async def rename(self, group_id: str, name: str, now: datetime) -> Group | None:
        """The renamed group; None if there is none. AlreadyExists("name") if the name is taken."""

    async def mark_deleted(self, group_id: str, now: datetime) -> bool:
        """Take the group out of every read and free its name; False if there was none."""

    async def list_after(self, group_id: str | None, limit: int) -> list[Group]: ...

    async def get_many(self, group_ids: list[str]) -> list[Group]:
        """The live groups among ``group_ids``, in id order."""

    async def add_member(self, member: GroupMember, max_groups: int) -> None:
        """Store the membership and pend its change in the user's document; AlreadyExists("user_id")
        if it exists, TooManyGroups past ``max_groups``, NotFound if the user is gone."""

    async def remove_member(self, group_id: str, user_id: str, now: datetime) -> bool:
        """False if there was no such membership."""

    async def members_after(self, group_id: str, user_id: str | None, limit: int) -> list[GroupMember]: ...

    async def memberships_after(self, user_id: str, group_id: str | None, limit: int) -> list[GroupMember]: ...

    async def sweep_deleted_groups(self, limit: int) -> int:
        """Remove up to ``limit`` memberships of deleted groups, and the groups left with none; how many removed."""
