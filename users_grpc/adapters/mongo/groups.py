"""The ``groups`` and ``group_members`` collections (:class:`MongoGroupRepository`).

A membership is a document of its own, ``{user_id, group_id, created_at}`` (both ObjectIds), in
``group_members``: its unique (user_id, group_id) index is also the collection's shard key
(docs/scaling.md), so "the groups of a user" (every access token) is one targeted, indexed query,
and its (group_id, user_id) index serves "the members of a group". No transaction is needed:

- adding writes the membership, then checks the user's cap and that the group is still live, then
  pends the change in the user's document where the user is live (one conditional update); a
  failed check takes the membership back. So a deletion marked after any of these checks finds the
  membership when it sweeps, and one marked before makes the add take it back;
- a deleted group is marked (gone for every read, its name free at once), and housekeeping removes
  its memberships a batch at a time (:meth:`MongoGroupRepository.sweep_deleted_groups`), each with
  its change, then the group: idempotent, so a sweep cut short is finished by the next;
- a deleted user's memberships go when its document does (``MongoChangeLog._finish_deletion``):
  one query on the shard key, bounded by the cap of groups per user.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.documents import Document, _is_duplicate_key, _object_id
from users_grpc.adapters.mongo.users_bson import _LIVE, _with_change
from users_grpc.domain.errors import AlreadyExists, NotFound, StorageUnavailable
from users_grpc.domain.groups import Group, GroupMember, GroupNotFound, TooManyGroups, group_name_key
from users_grpc.domain.model import ChangeType

log = logging.getLogger(__name__)

# A deleted group's name key: DEL (a control character) is in no group's name, so a deleted group
# never holds a name a live one could want.
_DELETED_KEY_PREFIX = "\x7fdeleted:"
# Before any mark: a range on the sparse index that every marked group is in (a $ne would scan).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Groups being deleted taken up per sweep.
_GROUPS_PER_SWEEP = 10


class MongoGroupRepository:
    """Groups by ``_id`` with their names unique (``groups`` stays small: one document per group,
    never sharded), and memberships in ``group_members``."""

    def __init__(self, database: AsyncDatabase[Document], changes: MongoChangeLog | None = None) -> None:
        self._groups: AsyncCollection[Document] = database["groups"]
        self._members: AsyncCollection[Document] = database["group_members"]
        self._users: AsyncCollection[Document] = database["users"]
        self._changes = changes or MongoChangeLog(database)

    @storage_call
    async def ensure_indexes(self) -> None:
        await self._groups.create_index([("name_key", ASCENDING)], unique=True, name="name_key_unique")
        # Sparse: only groups being deleted, which housekeeping's sweep reads.
        await self._groups.create_index([("deleting", ASCENDING)], sparse=True, name="deleting")
        # The shard key: a user's groups (tokens, ListUserGroups, a deletion) and each membership's uniqueness.
        await self._members.create_index(
            [("user_id", ASCENDING), ("group_id", ASCENDING)], unique=True, name="user_id_group_id_unique"
        )
        # A group's members (ListGroupMembers, the sweep after DeleteGroup).
        await self._members.create_index([("group_id", ASCENDING), ("user_id", ASCENDING)], name="group_id_user_id")

    def new_id(self) -> str:
        return str(ObjectId())

    @storage_call
    async def add(self, group: Group) -> None:
        try:
            await self._groups.insert_one(
                {
                    "_id": ObjectId(group.id),
                    "name": group.name,
                    "name_key": group_name_key(group.name),
                    "created_at": group.created_at,
                    "updated_at": group.updated_at,
                }
            )
        except DuplicateKeyError:
            raise AlreadyExists("name") from None

    @storage_call
    async def get(self, group_id: str) -> Group | None:
        document = await self._groups.find_one({"_id": _object_id(group_id), **_LIVE})
        return None if document is None else _group_from_document(document)

    @storage_call
    async def rename(self, group_id: str, name: str, now: datetime) -> Group | None:
        try:
            document = await self._groups.find_one_and_update(
                {"_id": _object_id(group_id), **_LIVE},
                {"$set": {"name": name, "name_key": group_name_key(name), "updated_at": now}},
                return_document=ReturnDocument.AFTER,
            )
        except OperationFailure as error:
            # FerretDB reports a unique index's refusal of an update as another error than MongoDB's.
            if not _is_duplicate_key(error):
                raise
            raise AlreadyExists("name") from None
        return None if document is None else _group_from_document(document)

    @storage_call
    async def mark_deleted(self, group_id: str, now: datetime) -> bool:
        marked = await self._groups.update_one(
            {"_id": _object_id(group_id), **_LIVE},
            {"$set": {"deleting": now, "name_key": _DELETED_KEY_PREFIX + group_id}},
        )
        return marked.modified_count == 1

    @storage_call
    async def list_after(self, group_id: str | None, limit: int) -> list[Group]:
        query: Document = {**_LIVE} if group_id is None else {"_id": {"$gt": _object_id(group_id)}, **_LIVE}
        cursor = self._groups.find(query).sort("_id", ASCENDING).limit(limit)
        return [_group_from_document(document) async for document in cursor]

    @storage_call
    async def get_many(self, group_ids: list[str]) -> list[Group]:
        if not group_ids:
            return []
        query = {"_id": {"$in": [_object_id(group_id) for group_id in group_ids]}, **_LIVE}
        cursor = self._groups.find(query).sort("_id", ASCENDING)
        return [_group_from_document(document) async for document in cursor]

    @storage_call
    async def add_member(self, member: GroupMember, max_groups: int) -> None:
        user_id, group_id = _object_id(member.user_id), _object_id(member.group_id)
        try:
            await self._members.insert_one({"user_id": user_id, "group_id": group_id, "created_at": member.created_at})
        except DuplicateKeyError:
            raise AlreadyExists("user_id") from None
        try:
            # Two adds racing past the cap both see it passed and both take theirs back: never over it.
            if await self._members.count_documents({"user_id": user_id}, limit=max_groups + 1) > max_groups:
                raise TooManyGroups()
            # Checked again after the insert: a deletion marked since the caller's check would sweep too early.
            if await self._groups.find_one({"_id": group_id, **_LIVE}, projection={"_id": 1}) is None:
                raise GroupNotFound()
            if not await self._pend_change(user_id, ChangeType.GROUP_MEMBER_ADDED, member.group_id, member.created_at):
                raise NotFound()
        except BaseException:
            # By the shard key, which the unique index makes name this membership alone.
            await self._members.delete_one({"user_id": user_id, "group_id": group_id})
            raise
        await self._publish(member.user_id)

    @storage_call
    async def remove_member(self, group_id: str, user_id: str, now: datetime) -> bool:
        removed = await self._members.delete_one({"user_id": _object_id(user_id), "group_id": _object_id(group_id)})
        if removed.deleted_count == 0:
            return False
        if await self._pend_change(_object_id(user_id), ChangeType.GROUP_MEMBER_REMOVED, group_id, now):
            await self._publish(user_id)
        return True

    @storage_call
    async def members_after(self, group_id: str, user_id: str | None, limit: int) -> list[GroupMember]:
        query: Document = {"group_id": _object_id(group_id)}
        if user_id is not None:
            query["user_id"] = {"$gt": _object_id(user_id)}
        cursor = self._members.find(query).sort([("group_id", ASCENDING), ("user_id", ASCENDING)]).limit(limit)
        return [_member_from_document(document) async for document in cursor]

    @storage_call
    async def memberships_after(self, user_id: str, group_id: str | None, limit: int) -> list[GroupMember]:
        query: Document = {"user_id": _object_id(user_id)}
        if group_id is not None:
            query["group_id"] = {"$gt": _object_id(group_id)}
        cursor = self._members.find(query).sort([("user_id", ASCENDING), ("group_id", ASCENDING)]).limit(limit)
        return [_member_from_document(document) async for document in cursor]

    @storage_call
    async def sweep_deleted_groups(self, limit: int) -> int:
        """Each membership's change is pended before the membership goes, so a sweep cut short
        repeats at most one change (consumers handle changes idempotently), never loses one."""
        removed = 0
        async for group in self._groups.find({"deleting": {"$gte": _EPOCH}}, projection={"_id": 1}).limit(
            _GROUPS_PER_SWEEP
        ):
            cursor = self._members.find({"group_id": group["_id"]}).sort(
                [("group_id", ASCENDING), ("user_id", ASCENDING)]
            )
            async for member in cursor.limit(limit - removed):
                await self._remove_swept(member)
                removed += 1
            if await self._members.find_one({"group_id": group["_id"]}, projection={"_id": 1}) is None:
                await self._groups.delete_one({"_id": group["_id"], "deleting": {"$ne": None}})
            if removed >= limit:
                break
        return removed

    async def _remove_swept(self, member: Document) -> None:
        now = datetime.now(UTC)
        if await self._pend_change(member["user_id"], ChangeType.GROUP_MEMBER_REMOVED, str(member["group_id"]), now):
            await self._publish(str(member["user_id"]))
        await self._members.delete_one({"user_id": member["user_id"], "group_id": member["group_id"]})

    async def _publish(self, user_id: str) -> None:
        # The fast path, as for every change (UsersCollection._publish): what fails here, the change
        # log's sweep publishes.
        try:
            await self._changes.publish(user_id)
        except (PyMongoError, StorageUnavailable):
            log.warning("changes left for the sweep", extra={"user_id": user_id}, exc_info=True)

    async def _pend_change(self, user_id: Any, change: ChangeType, group_id: str, now: datetime) -> bool:
        """Pend a membership change in the user's document, if the user is live; whether it was."""
        update = _with_change({}, change, now)
        update["$push"]["pending_changes"]["group_id"] = group_id
        pended = await self._users.update_one({"_id": user_id, **_LIVE}, update)
        return pended.matched_count == 1


def _group_from_document(document: Document) -> Group:
    return Group(
        id=str(document["_id"]),
        name=document["name"],
        created_at=document["created_at"],
        updated_at=document["updated_at"],
    )


def _member_from_document(document: Document) -> GroupMember:
    return GroupMember(
        group_id=str(document["group_id"]), user_id=str(document["user_id"]), created_at=document["created_at"]
    )
