"""WebAuthn challenges in the ``passkey_ceremonies`` collection (:class:`MongoCeremonyStore`).

In the database, not in a replica's memory: any replica finishes what another started. A
ceremony is taken with one ``find_one_and_delete`` by ``_id``: of concurrent finishes exactly one
gets it, and a replay finds nothing. Expired ones are refused when taken and purged by
housekeeping (index on ``expires_at``). Sharded by ``_id``, random: shard-ready.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from bson import Binary
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document
from users_grpc.domain.passkeys import Ceremony, CeremonyPurpose


class MongoCeremonyStore:
    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._ceremonies: AsyncCollection[Document] = database["passkey_ceremonies"]

    @storage_call
    async def ensure_indexes(self) -> None:
        await self._ceremonies.create_index([("expires_at", ASCENDING)], name="expires_at")

    def new_id(self) -> str:
        # 128 random bits: the id is all a finish presents besides the browser's response.
        return secrets.token_hex(16)

    @storage_call
    async def add(self, ceremony: Ceremony) -> None:
        await self._ceremonies.insert_one(
            {
                "_id": ceremony.id,
                "purpose": ceremony.purpose.value,
                "user_id": ceremony.user_id,
                "challenge": Binary(ceremony.challenge),
                "expires_at": ceremony.expires_at,
            }
        )

    @storage_call
    async def take(self, ceremony_id: str, purpose: CeremonyPurpose, now: datetime) -> Ceremony | None:
        document = await self._ceremonies.find_one_and_delete({"_id": ceremony_id})
        if document is None or document["purpose"] != purpose.value or document["expires_at"] <= now:
            return None
        return Ceremony(
            id=document["_id"],
            purpose=purpose,
            user_id=document["user_id"],
            challenge=bytes(document["challenge"]),
            expires_at=document["expires_at"],
        )

    @storage_call
    async def purge_expired(self, now: datetime) -> int:
        result = await self._ceremonies.delete_many({"expires_at": {"$lte": now}})
        return result.deleted_count
