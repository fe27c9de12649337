"""Unique usernames and emails through the ``claims`` collection (:class:`MongoClaims`)."""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document


class Claim(enum.Enum):
    NEW = "new"  # claimed by this call: give it back if the change fails
    HELD = "held"  # the user held it already (a rename that changes only letter case)


# Longer than any write between a claim and its user's document may take (the database budget
# of one call is at most USERS_DB_TIMEOUT_SECONDS): a younger claim may still be in use.
CLAIM_SETTLE_SECONDS = 120.0
_CLAIM_KINDS = ("username", "email")


def claim_documents(user: Document, now: datetime) -> list[Document]:
    """The settled claims on a user document's names: for tools that write users straight into the
    database (benchmarks seeding many users), which must claim their names as the service does."""
    return [
        {"_id": f"{kind}:{user[f'{kind}_key']}", "user_id": user["_id"], "claimed_at": now} for kind in _CLAIM_KINDS
    ]


class MongoClaims:
    """The ``claims`` collection: one document per normalized username and email, its ``_id``
    ``"<kind>:<key>"``, naming the user that holds it.

    This is MongoDB's pattern for uniqueness outside a sharded collection's shard key: the
    unique ``_id`` of an unsharded (or ``_id``-sharded) collection decides every race, one
    insert at a time, without transactions. A claim is pending from its insert until its
    user's document is written; :meth:`release_stale` settles or frees pending claims past
    :data:`CLAIM_SETTLE_SECONDS` by whether the user holds the key, and a claimant that meets
    a settled claim whose user no longer holds the key (a deletion that died halfway) takes it
    over after the same bound.
    """

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._claims: AsyncCollection[Document] = database["claims"]
        self._users: AsyncCollection[Document] = database["users"]

    async def ensure_indexes(self) -> None:
        # Sparse: only claims still pending are indexed, for release_stale.
        await self._claims.create_index([("pending_since", ASCENDING)], sparse=True, name="pending_since")

    async def claim(self, kind: str, key: str, user_id: ObjectId, now: datetime) -> Claim | None:
        """Claim ``key`` for ``user_id``; None if another user holds it."""
        claim_id = f"{kind}:{key}"
        for _ in range(3):  # a claim released between our insert and our read: try again
            try:
                await self._claims.insert_one(
                    {"_id": claim_id, "user_id": user_id, "claimed_at": now, "pending_since": now}
                )
                return Claim.NEW
            except DuplicateKeyError:
                existing = await self._claims.find_one({"_id": claim_id})
            if existing is None:
                continue
            if existing["user_id"] == user_id:
                return Claim.HELD
            young = existing["claimed_at"] > now - timedelta(seconds=CLAIM_SETTLE_SECONDS)
            if young or await self._holds(existing["user_id"], kind, key):
                return None
            taken_over = await self._claims.find_one_and_update(
                {"_id": claim_id, "user_id": existing["user_id"], "claimed_at": existing["claimed_at"]},
                {"$set": {"user_id": user_id, "claimed_at": now, "pending_since": now}},
            )
            return Claim.NEW if taken_over is not None else None
        return None

    async def holder(self, kind: str, key: str) -> Any:
        """The id of the user claiming ``key``, or None."""
        claim = await self._claims.find_one({"_id": f"{kind}:{key}"}, projection={"user_id": 1})
        return None if claim is None else claim["user_id"]

    async def _holds(self, user_id: Any, kind: str, key: str) -> bool:
        # By _id alone, the key compared here: the embedded FerretDB uses an index only for that filter.
        document = await self._users.find_one({"_id": user_id}, projection={f"{kind}_key": 1, f"{kind}_keys": 1})
        # A username or email is one key; passkeys' credential ids are a list (users_passkeys.py).
        return document is not None and (document.get(f"{kind}_key") == key or key in document.get(f"{kind}_keys", ()))

    async def settle(self, kind: str, key: str, user_id: ObjectId) -> None:
        await self._claims.update_one({"_id": f"{kind}:{key}", "user_id": user_id}, {"$unset": {"pending_since": ""}})

    async def release(self, kind: str, key: str, user_id: Any) -> None:
        await self._claims.delete_one({"_id": f"{kind}:{key}", "user_id": user_id})

    async def release_all_of(self, user: Document) -> None:
        for kind in _CLAIM_KINDS:
            if f"{kind}_key" in user:
                await self.release(kind, user[f"{kind}_key"], user["_id"])
        for key in user.get("passkey_keys", ()):
            await self.release("passkey", key, user["_id"])

    @storage_call
    async def release_stale(self, now: datetime, limit: int = 1000) -> int:
        """Settle pending claims older than the bound whose user holds them; release the others."""
        released = 0
        cutoff = now - timedelta(seconds=CLAIM_SETTLE_SECONDS)
        async for claim in self._claims.find({"pending_since": {"$lt": cutoff}}).limit(limit):
            kind, _, key = claim["_id"].partition(":")
            if await self._holds(claim["user_id"], kind, key):
                await self.settle(kind, key, claim["user_id"])
            else:
                result = await self._claims.delete_one(
                    {"_id": claim["_id"], "user_id": claim["user_id"], "claimed_at": claim["claimed_at"]}
                )
                released += result.deleted_count
        return released

    @storage_call
    async def backfill(self, after: Any, limit: int, now: datetime) -> tuple[Any, list[str]]:
        """Claim the names of up to ``limit`` users after ``after`` (in ``_id`` order) for them: the
        last ``_id`` done (None when no user is left) and the names another user holds already."""
        query: Document = {} if after is None else {"_id": {"$gt": after}}
        last, conflicts = None, []
        cursor = self._users.find(query, projection={"username_key": 1, "email_key": 1}).sort("_id", ASCENDING)
        async for user in cursor.limit(limit):
            last = user["_id"]
            for kind in _CLAIM_KINDS:
                key = user.get(f"{kind}_key")
                if key is None:
                    continue
                claim = await self._claims.find_one_and_update(
                    {"_id": f"{kind}:{key}"},
                    {"$setOnInsert": {"user_id": user["_id"], "claimed_at": now}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                if claim is not None and claim["user_id"] != user["_id"]:
                    conflicts.append(f"{kind} of user {user['_id']} is claimed by user {claim['user_id']}")
        return last, conflicts
