"""The ``schema`` collection and the identifier indexes, whose form depends on the schema version."""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from users_grpc.mongo.calls import storage_call
from users_grpc.mongo.claims import MongoClaims
from users_grpc.mongo.documents import _INDEX_NOT_FOUND, Document


class MongoSchema:
    """The ``schema`` collection: which version of this module's layout the database holds, and the
    progress of a migration under way. See :mod:`users_grpc.migrations`."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._schema: AsyncCollection[Document] = database["schema"]
        self._users: AsyncCollection[Document] = database["users"]
        self.claims = MongoClaims(database)

    @storage_call
    async def state(self) -> Document | None:
        return await self._schema.find_one({"_id": "users"})

    @storage_call
    async def has_users(self) -> bool:
        return await self._users.find_one({}, projection={"_id": 1}) is not None

    @storage_call
    async def record(self, version: int, **progress: Any) -> None:
        """Record ``version`` (never lowering it), with the progress of the next step, if any."""
        update: Document = {"$max": {"version": version}}
        if progress:
            update["$set"] = progress
        else:
            update["$unset"] = {"progress": ""}
        await self._schema.update_one({"_id": "users"}, update, upsert=True)

    @storage_call
    async def ensure_identifier_indexes(self, *, unique: bool) -> None:
        """The lookups by username and email. Unique before schema 2; plain from then on, since
        claims keep the names unique and a unique index cannot exist on a sharded ``users``."""
        for field in ("username_key", "email_key"):
            if unique:
                await self._users.create_index([(field, ASCENDING)], unique=True, name=f"{field}_unique")
            else:
                await self._users.create_index([(field, ASCENDING)], name=field)

    @storage_call
    async def drop_unique_identifier_indexes(self) -> None:
        for field in ("username_key", "email_key"):
            try:
                await self._users.drop_index(f"{field}_unique")
            except OperationFailure as error:
                if error.code != _INDEX_NOT_FOUND:
                    raise
