"""The change feed's store: ``user_changes`` and its head (:class:`MongoChangeLog`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.claims import MongoClaims
from users_grpc.adapters.mongo.documents import Document, _is_duplicate_key, _object_id
from users_grpc.adapters.mongo.metadata_bson import _metadata_keys_from_document
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.mongo.users_bson import _notice_from_document, _user_from_document
from users_grpc.domain.errors import StorageUnavailable
from users_grpc.domain.model import ChangeType, UserChange


class MongoChangeLog:
    """The change feed's store: the ``user_changes`` collection, one document per change, its
    ``_id`` the change's place in one dense global sequence (1, 2, 3, ...).

    Why a reader that reads ``_id > cursor`` in order never skips a change:

    1. A change and its pending entry are one single-document update of the user (see
       ``_with_change``): no change without its entry, whatever crashes or cancellations.
    2. An entry is published by inserting it at the next number: starting from the head (a
       number known stored: ``user_changes_head``, moved up after each insert), a publisher
       tries n + 1, and on finding it taken (the unique ``_id``) the next, and so on. So an
       insert at n succeeds only after every number below n was found stored: the sequence has
       no holes, and a change can never appear later below a cursor already passed. (A counter
       handing numbers out would not do: a publisher dying between taking a number and
       inserting would leave a hole, and a reader cannot tell a hole from a change still on
       its way.) Readers also deliver only consecutive numbers, each read by its ``_id``.
    3. The unique (user_id, number) index makes publishing an entry twice (two publishers, or
       one that died before removing the entry) a no-op; entries are removed from the user's
       document only after they are published, and are published in the user's own order.
    4. Retention deletes only a prefix of the sequence and always keeps the newest change, so
       the maximum never goes back; a cursor below what is kept is refused, never skipped.
    5. A deleted user's document keeps its entries until they are published: a deletion first
       marks the document (``deleting``; every call sees the user as gone from then on), then
       publishes, moves the user's pending notices to the outbox, and only then deletes it.
    """

    def __init__(self, database: AsyncDatabase[Document], outbox: MongoOutbox | None = None) -> None:
        self._changes: AsyncCollection[Document] = database["user_changes"]
        # One document: the highest number known stored, so publishers need not look for the maximum.
        self._heads: AsyncCollection[Document] = database["user_changes_head"]
        self._users: AsyncCollection[Document] = database["users"]
        self._outbox = outbox
        self._claims = MongoClaims(database)
        self._group_members: AsyncCollection[Document] = database["group_members"]
        # Called after this process published changes, so that its own watchers need not wait for a poll.
        self.on_published: Callable[[], None] | None = None

    @storage_call
    async def ensure_indexes(self) -> None:
        await self._changes.create_index(
            [("user_id", ASCENDING), ("number", ASCENDING)], unique=True, name="user_id_number_unique"
        )
        # Serves housekeeping's purge by age.
        await self._changes.create_index([("published_at", ASCENDING)], name="published_at")
        # Sparse: only documents with changes waiting, or being deleted, are indexed; the sweep reads these.
        await self._users.create_index(
            [("pending_changes_since", ASCENDING)], sparse=True, name="pending_changes_since"
        )
        await self._users.create_index([("deleting", ASCENDING)], sparse=True, name="deleting")

    @storage_call
    async def publish(self, user_id: str) -> None:
        """Publish the user's pending changes in their order; finish the user's deletion if it is marked."""
        await self._publish(_object_id(user_id))

    @storage_call
    async def sweep(self, changed_before: datetime, limit: int = 100) -> int:
        """Publish what waits since before ``changed_before`` (what a publisher that died left), and
        finish deletions marked before then; how many users it took up (at most ``limit`` of each)."""
        ids: dict[Any, None] = {}
        for query in ({"pending_changes_since": {"$lte": changed_before}}, {"deleting": {"$lte": changed_before}}):
            async for document in self._users.find(query, projection={"_id": 1}).limit(limit):
                ids[document["_id"]] = None
        for user_id in ids:
            await self._publish(user_id)
        return len(ids)

    @storage_call
    async def last_sequence(self) -> int:
        """The newest change's sequence number; 0 before the first change."""
        return await self._last_sequence()

    @storage_call
    async def read_after(self, sequence: int, limit: int) -> list[UserChange]:
        """Up to ``limit`` changes numbered above ``sequence``, in order; if there is none at
        sequence + 1 but there are later ones (the changes after ``sequence`` are gone, or one is
        not visible yet), the lowest change above ``sequence`` alone: the caller tells which.

        A caller that is up to date (the usual poll) costs one lookup by ``_id``, which FerretDB
        too serves from an index; only catching up reads a range (which FerretDB answers by a scan).
        """
        if await self._changes.find_one({"_id": sequence + 1}, projection={"_id": 1}) is None:
            if await self._last_sequence() <= sequence:
                return []
            lowest = await self._changes.find_one({"_id": {"$gt": sequence}}, sort=[("_id", ASCENDING)])
            return [] if lowest is None else [_change_from_document(lowest)]
        cursor = self._changes.find({"_id": {"$gt": sequence, "$lte": sequence + limit}}).sort("_id", ASCENDING)
        return [_change_from_document(document) async for document in cursor]

    async def _last_sequence(self) -> int:
        # The head names a stored change, and is at most a few behind (a publisher died between
        # its insert and moving the head): walk on from it.
        last = await self._head()
        while await self._changes.find_one({"_id": last + 1}, projection={"_id": 1}) is not None:
            last += 1
        return last

    async def _head(self) -> int:
        head = await self._heads.find_one({"_id": _HEAD})
        if head is not None:
            return int(head["last"])
        # No head yet (the first change, or changes stored before heads existed): the maximum, read once.
        newest = await self._changes.find_one({}, projection={"_id": 1}, sort=[("_id", DESCENDING)])
        return 0 if newest is None else int(newest["_id"])

    async def _publish(self, user_id: Any) -> None:
        document = await self._users.find_one({"_id": user_id}, projection=_PUBLISHED_FIELDS)
        if document is None:
            return
        entries: list[Document] = document.get("pending_changes") or []
        if entries:
            first_number = int(document.get("change_number", len(entries))) - len(entries) + 1
            snapshot = _user_snapshot(document)
            for offset, entry in enumerate(entries):
                deleted = entry["type"] == ChangeType.DELETED.value
                await self._append(
                    {
                        "user_id": str(user_id),
                        "number": first_number + offset,
                        "type": entry["type"],
                        "changed_at": entry["at"],
                        "published_at": datetime.now(UTC),
                        **({} if deleted else {"user": snapshot}),
                        **({"metadata_keys": entry["metadata_keys"]} if "metadata_keys" in entry else {}),
                        **({"group_id": entry["group_id"]} if "group_id" in entry else {}),
                    }
                )
            # Whole elements, as written: FerretDB's $pull takes no conditions.
            await self._users.update_one({"_id": user_id}, {"$pullAll": {"pending_changes": entries}})
            await self._users.update_one(
                {"_id": user_id, "pending_changes": {"$size": 0}},
                {"$unset": {"pending_changes": "", "pending_changes_since": ""}},
            )
            if self.on_published is not None:
                self.on_published()
        if document.get("deleting") is not None:
            await self._finish_deletion(user_id)

    async def _append(self, change: Document) -> None:
        """Insert ``change`` at the next free number, which is always (the highest stored) + 1.

        Starts from the head (a stored number) and moves up one on each number found taken: so
        when an insert at n succeeds, every number below n was found stored.
        """
        number = await self._head() + 1
        for _ in range(_APPEND_ROUNDS):
            change["_id"] = number
            try:
                await self._changes.insert_one(change)
            except DuplicateKeyError:
                # Which unique index refused it? FerretDB does not say, so look, by _id only.
                holder = await self._changes.find_one({"_id": number}, projection={"user_id": 1, "number": 1})
                if holder is None or (holder["user_id"], holder["number"]) == (change["user_id"], change["number"]):
                    return  # published already (the user's number is taken), by another publisher or earlier
                number = max(number + 1, await self._head() + 1)  # the number is another change's
                continue
            await self._move_head(number)
            return
        raise StorageUnavailable("too many publishers at once; the change stays pending")

    async def _move_head(self, number: int) -> None:
        try:
            await self._heads.update_one(
                {"_id": _HEAD, "last": {"$lt": number}}, {"$set": {"last": number}}, upsert=True
            )
        except OperationFailure as error:
            # The head is at or past the number already (the upsert's insert clashed): nothing to do.
            if not _is_duplicate_key(error):
                raise

    async def _finish_deletion(self, user_id: Any) -> None:
        """Once a deleted user's changes are all published: move its pending notices to the outbox,
        then delete the document (no new notice can arrive: every update skips marked documents)."""
        document = await self._users.find_one(
            {"_id": user_id, "deleting": {"$ne": None}},
            projection={"pending_mail": 1, "pending_changes": 1, "username_key": 1, "email_key": 1},
        )
        if document is None or document.get("pending_changes"):
            return
        # Its memberships before the document: a crash between leaves the mark, and this runs again.
        # One query on group_members' shard key, bounded by the cap of groups per user.
        await self._group_members.delete_many({"user_id": user_id})
        if self._outbox is not None:
            for notice in document.get("pending_mail") or ():
                moved = _notice_from_document(notice)
                await self._outbox.enqueue(moved.mail, datetime.now(UTC), mail_id=moved.id, notice_of=str(user_id))
        deleted = await self._users.delete_one(
            {
                "_id": user_id,
                "deleting": {"$ne": None},
                "$or": [{"pending_changes": None}, {"pending_changes": {"$size": 0}}],
            }
        )
        if deleted.deleted_count:
            # Its names are free now. If the process dies first, the claims name a user that is
            # gone, and the next claimant takes them over (MongoClaims.claim).
            await self._claims.release_all_of(document)


# Publishers retry this often when other publishers take the number they computed.
_APPEND_ROUNDS = 50
_HEAD = "user_changes"

# The User a change shows, as stored: never a secret.
_SNAPSHOT_FIELDS = (
    "username",
    "first_name",
    "last_name",
    "email",
    "gender",
    "role",
    "is_active",
    "state",
    "created_at",
    "updated_at",
    "revision",
    "language_code",
    "metadata",
    "password_change_required",
    "password_changed_at",
)
# What a publisher reads of a user: the snapshot's fields and what publishing itself needs.
_PUBLISHED_FIELDS = {
    name: 1 for name in (*_SNAPSHOT_FIELDS, "mfa.state", "change_number", "pending_changes", "deleting")
}


def _user_snapshot(document: Document) -> Document:
    snapshot: Document = {name: document[name] for name in ("_id", *_SNAPSHOT_FIELDS) if name in document}
    if (document.get("mfa") or {}).get("state") is not None:
        snapshot["mfa"] = {"state": document["mfa"]["state"]}
    return snapshot


def _change_from_document(document: Document) -> UserChange:
    user = document.get("user")
    return UserChange(
        sequence=int(document["_id"]),
        user_id=document["user_id"],
        number=int(document["number"]),
        type=ChangeType(document["type"]),
        changed_at=document["changed_at"],
        user=None if user is None else _user_from_document(user),
        metadata_keys=_metadata_keys_from_document(document.get("metadata_keys")),
        group_id=document.get("group_id", ""),
    )
