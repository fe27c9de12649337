"""The ``throttles`` collection: failure tallies, known sources, rate counts."""

from __future__ import annotations

from datetime import datetime, timedelta

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document
from users_grpc.domain.errors import StorageUnavailable
from users_grpc.domain.model import Tally, to_milliseconds


class MongoThrottleStore:
    """The ``throttles`` collection: one small document per tally, found by ``_id``.

    Failure tallies change only by conditional updates: below its limit a tally counts every try
    at once; at the limit only by compare-and-set on its count and time, so two tries racing
    there never both count as the one a delay lets through.
    """

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._tallies: AsyncCollection[Document] = database["throttles"]

    @storage_call
    async def ensure_indexes(self) -> None:
        await self._tallies.create_index([("account", ASCENDING)], name="account")
        # Served to housekeeping, which deletes tallies past their use (FerretDB has no TTL indexes).
        await self._tallies.create_index([("expires_at", ASCENDING)], name="expires_at")

    @storage_call
    async def get(self, keys: list[str]) -> dict[str, Tally]:
        documents = await self._tallies.find({"_id": {"$in": keys}}).to_list()
        return {document["_id"]: _tally_from_document(document) for document in documents}

    @storage_call
    async def count_failure(
        self,
        key: str,
        account: str,
        *,
        seen: Tally | None,
        below: int,
        now: datetime,
        window: timedelta,
        settles_by: datetime,
        expires_at: datetime,
    ) -> bool:
        # BSON dates hold milliseconds: the time stored must equal the one read back, for compare-and-set.
        now = to_milliseconds(now)
        fresh = {
            "account": account,
            "kind": "password",
            "count": 1,
            "pending": 1,
            "last_at": now,
            "settles_by": settles_by,
            "expires_at": expires_at,
        }
        if seen is None:
            try:
                await self._tallies.insert_one({"_id": key, **fresh})
            except DuplicateKeyError:
                return False
            return True
        as_seen = {"count": seen.count, "last_at": seen.last_at}
        if seen.last_at <= now - window:
            result = await self._tallies.update_one({"_id": key, **as_seen}, {"$set": fresh})
            return result.modified_count == 1
        # Below the limit any number of tries count at once, whatever the others did meanwhile: only
        # at the limit must the tally still be as seen (the one try a delay lets through).
        result = await self._tallies.update_one(
            {"_id": key, "last_at": {"$gt": now - window}, "$or": [{"count": {"$lt": below}}, as_seen]},
            {
                "$inc": {"count": 1, "pending": 1},
                "$max": {"last_at": now, "settles_by": settles_by, "expires_at": expires_at},
            },
        )
        return result.modified_count == 1

    @storage_call
    async def settle_failure(self, key: str, now: datetime) -> None:
        now = to_milliseconds(now)  # as count_failure stores it
        await self._tallies.update_one(
            {"_id": key, "pending": {"$gt": 0}}, {"$inc": {"pending": -1}, "$max": {"last_at": now}}
        )

    @storage_call
    async def uncount_failure(self, key: str) -> None:
        await self._tallies.update_one(
            {"_id": key, "count": {"$gt": 0}, "pending": {"$gt": 0}}, {"$inc": {"count": -1, "pending": -1}}
        )

    @storage_call
    async def forget(self, key: str) -> None:
        await self._tallies.delete_one({"_id": key})

    @storage_call
    async def remember(self, key: str, account: str, now: datetime, expires_at: datetime) -> None:
        await self._tallies.update_one(
            {"_id": key},
            {
                "$set": {"account": account, "kind": "known", "last_at": now, "expires_at": expires_at},
                "$inc": {"count": 1},
            },
            upsert=True,
        )

    @storage_call
    async def forget_account(self, account: str) -> None:
        await self._tallies.delete_many({"account": account, "kind": "password"})

    @storage_call
    async def hit(self, key: str, expires_at: datetime) -> int:
        for _ in range(2):
            try:
                document = await self._tallies.find_one_and_update(
                    {"_id": key},
                    {"$inc": {"count": 1}, "$setOnInsert": {"kind": "rate", "expires_at": expires_at}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                continue  # MongoDB: two first hits raced to insert; the loser increments the winner's
            assert document is not None
            return int(document["count"])
        raise StorageUnavailable()


def _tally_from_document(document: Document) -> Tally:
    return Tally(
        count=document["count"],
        last_at=document["last_at"],
        pending=document.get("pending", 0),
        settles_by=document.get("settles_by"),
    )
