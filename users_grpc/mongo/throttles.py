"""The ``throttles`` collection: failure tallies, known sources, rate counts."""

from __future__ import annotations

from datetime import datetime, timedelta

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.domain import Tally
from users_grpc.errors import StorageUnavailable
from users_grpc.mongo.calls import storage_call
from users_grpc.mongo.documents import Document


class MongoThrottleStore:
    """The ``throttles`` collection: one small document per tally, found by ``_id``.

    Failure tallies change only by compare-and-set on their count and time, so two
    tries racing for one tally never both count as the same failure.
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
        return {document["_id"]: Tally(count=document["count"], last_at=document["last_at"]) for document in documents}

    @storage_call
    async def count_failure(
        self, key: str, account: str, *, seen: Tally | None, now: datetime, window: timedelta, expires_at: datetime
    ) -> Tally | None:
        # BSON dates hold milliseconds: the tally returned must equal the one stored, for compare-and-set.
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        count = 1 if seen is None or seen.last_at <= now - window else seen.count + 1
        tally = Tally(count=count, last_at=now)
        document = {
            "account": account,
            "kind": "password",
            "count": tally.count,
            "last_at": now,
            "expires_at": expires_at,
        }
        if seen is None:
            try:
                await self._tallies.insert_one({"_id": key, **document})
            except DuplicateKeyError:
                return None
            return tally
        result = await self._tallies.update_one(
            {"_id": key, "count": seen.count, "last_at": seen.last_at}, {"$set": document}
        )
        return tally if result.modified_count == 1 else None

    @storage_call
    async def uncount_failure(self, key: str) -> None:
        await self._tallies.update_one({"_id": key, "count": {"$gt": 0}}, {"$inc": {"count": -1}})

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
