"""The service's own secrets: signing keys (``signing_keys``) and key material (``key_material``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document
from users_grpc.domain.model import StoredKey


class MongoKeyStore:
    """The ``signing_keys`` collection; private keys arrive and leave sealed."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._keys: AsyncCollection[Document] = database["signing_keys"]

    @storage_call
    async def add(self, key: StoredKey) -> None:
        await self._keys.insert_one(
            {
                "_id": key.kid,
                "sealed_private_key": key.sealed_private_key,
                "created_at": key.created_at,
                "retired_at": key.retired_at,
            }
        )

    @storage_call
    async def all(self) -> list[StoredKey]:
        documents = await self._keys.find({}).to_list()
        return [
            StoredKey(
                kid=document["_id"],
                sealed_private_key=bytes(document["sealed_private_key"]),
                created_at=document["created_at"],
                retired_at=document.get("retired_at"),
            )
            for document in documents
        ]

    @storage_call
    async def retire(self, kid: str, now: datetime) -> bool:
        result = await self._keys.update_one({"_id": kid, "retired_at": None}, {"$set": {"retired_at": now}})
        return result.modified_count == 1

    @storage_call
    async def reseal(self, kid: str, sealed: bytes, resealed: bytes) -> bool:
        """Replace the sealed private key, unless it changed since it was read as ``sealed``."""
        result = await self._keys.update_one(
            {"_id": kid, "sealed_private_key": sealed}, {"$set": {"sealed_private_key": resealed}}
        )
        return result.modified_count == 1


class MongoKeyMaterial:
    """The ``key_material`` collection: named secrets of the service itself (the digest root),
    sealed under the key-encryption key, by ``_id``."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._material: AsyncCollection[Document] = database["key_material"]

    @storage_call
    async def get(self, name: str) -> bytes | None:
        document = await self._material.find_one({"_id": name})
        return None if document is None else bytes(document["sealed"])

    @storage_call
    async def add(self, name: str, sealed: bytes) -> bool:
        """Store it unless one of that name exists (another replica was first): then False."""
        try:
            await self._material.insert_one({"_id": name, "sealed": sealed})
        except DuplicateKeyError:
            return False
        return True

    @storage_call
    async def reseal(self, name: str, sealed: bytes, resealed: bytes) -> bool:
        """Replace it, unless it changed since it was read as ``sealed``."""
        result = await self._material.update_one({"_id": name, "sealed": sealed}, {"$set": {"sealed": resealed}})
        return result.modified_count == 1

    @storage_call
    async def named_with_prefix(self, prefix: str) -> list[tuple[str, bytes, datetime | None]]:
        """Name, sealed value and ``in_use_from`` (None if it has none) of each secret whose name
        starts with ``prefix``; an anchored prefix of ``_id``, so served by its index."""
        cursor = self._material.find({"_id": {"$regex": f"^{re.escape(prefix)}"}})
        return [
            (str(document["_id"]), bytes(document["sealed"]), self._aware_or_none(document.get("in_use_from")))
            async for document in cursor
        ]

    @staticmethod
    def _aware_or_none(value: datetime | None) -> datetime | None:
        # BSON dates are UTC; a client without tz_aware reads them naive.
        return None if value is None else value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    @storage_call
    async def add_in_use_from(self, name: str, sealed: bytes, in_use_from: datetime) -> bool:
        """Store it, to be used from ``in_use_from``, unless one of that name exists: then False."""
        try:
            await self._material.insert_one({"_id": name, "sealed": sealed, "in_use_from": in_use_from})
        except DuplicateKeyError:
            return False
        return True
