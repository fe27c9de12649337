"""The ``sessions`` collection."""

from __future__ import annotations

from datetime import datetime

from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import _INDEX_NOT_FOUND, Document, _object_id
from users_grpc.domain.model import Session


class MongoSessionRepository:
    """The ``sessions`` collection: one document per session, holding its refresh-token generation and
    the keyed digest of its current token, found by ``_id`` (which the token names)."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._sessions: AsyncCollection[Document] = database["sessions"]

    @storage_call
    async def ensure_indexes(self) -> None:
        await self._sessions.create_index([("user_id", ASCENDING)], name="user_id")
        # Serve housekeeping's purge of ended sessions.
        await self._sessions.create_index([("expires_at", ASCENDING)], name="expires_at")
        await self._sessions.create_index([("revoked_at", ASCENDING)], name="revoked_at")
        # Sessions found refresh tokens by digest, and kept every used one, before tokens named their session.
        existing = {index["name"] async for index in await self._sessions.list_indexes()}
        for obsolete in ("token_digest_unique", "used_digests"):
            if obsolete in existing:
                try:
                    await self._sessions.drop_index(obsolete)
                except OperationFailure as error:
                    if error.code != _INDEX_NOT_FOUND:  # else another replica, starting too, dropped it first
                        raise

    def new_id(self) -> str:
        return str(ObjectId())

    @storage_call
    async def create(
        self,
        session_id: str,
        user_id: str,
        token_digest: str,
        now: datetime,
        expires_at: datetime,
        token_version: int,
    ) -> Session:
        document: Document = {
            "_id": _object_id(session_id),
            "user_id": user_id,
            "token_version": token_version,
            "generation": 0,
            "token_digest": token_digest,
            "created_at": now,
            "last_used_at": now,
            "expires_at": expires_at,
            "revoked_at": None,
        }
        await self._sessions.insert_one(document)
        return _session_from_document(document)

    @storage_call
    async def rotate(
        self, session_id: str, generation: int, token_digest: str, new_token_digest: str, now: datetime
    ) -> Session | None:
        document = await self._sessions.find_one_and_update(
            {
                "_id": _object_id(session_id),
                "generation": generation,
                "token_digest": token_digest,
                "revoked_at": None,
                "expires_at": {"$gt": now},
            },
            {"$set": {"token_digest": new_token_digest, "last_used_at": now}, "$inc": {"generation": 1}},
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else _session_from_document(document)

    @storage_call
    async def revoke_replayed(self, session_id: str, generation: int, now: datetime) -> Session | None:
        document = await self._sessions.find_one_and_update(
            {"_id": _object_id(session_id), "generation": {"$gt": generation}, "revoked_at": None},
            {"$set": {"revoked_at": now}},
        )
        return None if document is None else _session_from_document(document)

    @storage_call
    async def revoke(self, session_id: str, now: datetime) -> None:
        await self._sessions.update_one(
            {"_id": _object_id(session_id), "revoked_at": None}, {"$set": {"revoked_at": now}}
        )

    @storage_call
    async def list_active(self, user_id: str, now: datetime) -> list[Session]:
        cursor = self._sessions.find(
            # Sessions from before refresh tokens named their session have no generation: their tokens
            # are refused, so they are not listed as active.
            {"user_id": user_id, "revoked_at": None, "expires_at": {"$gt": now}, "generation": {"$exists": True}}
        )
        documents = await cursor.sort("created_at", -1).to_list()
        return [_session_from_document(document) for document in documents]

    @storage_call
    async def revoke_all(self, user_id: str, now: datetime) -> None:
        await self._sessions.update_many({"user_id": user_id, "revoked_at": None}, {"$set": {"revoked_at": now}})


def _session_from_document(document: Document) -> Session:
    return Session(
        id=str(document["_id"]),
        user_id=document["user_id"],
        created_at=document["created_at"],
        last_used_at=document["last_used_at"],
        expires_at=document["expires_at"],
        token_version=document.get("token_version", 0),
    )
