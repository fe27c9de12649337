"""The ``service_accounts`` collection."""

from __future__ import annotations

from bson import ObjectId
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import ServiceAccount, ServiceAccountPermission


class MongoServiceAccountRepository:
    """The ``service_accounts`` collection: by ``_id`` (the client id), the name unique."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._accounts: AsyncCollection[Document] = database["service_accounts"]

    @storage_call
    async def ensure_indexes(self) -> None:
        await self._accounts.create_index([("name", ASCENDING)], unique=True, name="name_unique")

    def new_id(self) -> str:
        return str(ObjectId())

    @storage_call
    async def add(self, account: ServiceAccount, secret_digest: str) -> None:
        try:
            await self._accounts.insert_one(
                {
                    "_id": ObjectId(account.client_id),
                    "name": account.name,
                    "secret_digest": secret_digest,
                    "created_at": account.created_at,
                    "permissions": sorted(permission.value for permission in account.permissions),
                }
            )
        except DuplicateKeyError:
            raise AlreadyExists("name") from None

    @storage_call
    async def secret_digest(self, client_id: str) -> str | None:
        document = await self._accounts.find_one({"_id": _object_id(client_id)}, {"secret_digest": 1})
        return None if document is None else str(document["secret_digest"])

    @storage_call
    async def get(self, client_id: str) -> ServiceAccount | None:
        document = await self._accounts.find_one({"_id": _object_id(client_id)}, {"secret_digest": 0})
        return None if document is None else _service_account_from_document(document)

    @storage_call
    async def list_after(self, client_id: str | None, limit: int) -> list[ServiceAccount]:
        query: Document = {} if client_id is None else {"_id": {"$gt": _object_id(client_id)}}
        cursor = self._accounts.find(query, {"secret_digest": 0}).sort("_id", ASCENDING).limit(limit)
        return [_service_account_from_document(document) async for document in cursor]

    @storage_call
    async def delete(self, client_id: str) -> bool:
        return (await self._accounts.delete_one({"_id": _object_id(client_id)})).deleted_count == 1


def _service_account_from_document(document: Document) -> ServiceAccount:
    return ServiceAccount(
        client_id=str(document["_id"]),
        name=document["name"],
        created_at=document["created_at"],
        # Absent from accounts made before permissions existed: none.
        permissions=frozenset(ServiceAccountPermission(value) for value in document.get("permissions", ())),
    )
