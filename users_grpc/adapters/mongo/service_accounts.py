"""The ``service_accounts`` collection, with each account's tokens inside it.

Tokens are embedded, not a collection of their own: an account holds at most
MAX_TOKENS_PER_ACCOUNT, so the document stays small; a call with a token reads the account and
the token in one read by ``_id`` (the account's permissions must be read at every call anyway);
and deleting the account deletes its tokens in the same single-document write, so no sweep and no
window in which a token outlives its account. ``tokens`` maps each token id to its record (a map,
not an array, so every update names its path without the positional operator); ``token_count``
bounds it with a conditional update. The collection is unsharded (docs/scaling.md).
"""

from __future__ import annotations

from datetime import datetime

from bson import ObjectId
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import ServiceAccount, ServiceAccountPermission
from users_grpc.domain.service_account_tokens import ServiceAccountToken, TokenHolder

# Reads of the account itself skip its tokens and the digests.
_ACCOUNT_ONLY: Document = {"secret_digest": 0, "tokens": 0}


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
        document = await self._accounts.find_one({"_id": _object_id(client_id)}, _ACCOUNT_ONLY)
        return None if document is None else _service_account_from_document(document)

    @storage_call
    async def list_after(self, client_id: str | None, limit: int) -> list[ServiceAccount]:
        query: Document = {} if client_id is None else {"_id": {"$gt": _object_id(client_id)}}
        cursor = self._accounts.find(query, _ACCOUNT_ONLY).sort("_id", ASCENDING).limit(limit)
        return [_service_account_from_document(document) async for document in cursor]

    @storage_call
    async def delete(self, client_id: str) -> bool:
        return (await self._accounts.delete_one({"_id": _object_id(client_id)})).deleted_count == 1

    @storage_call
    async def add_token(self, token: ServiceAccountToken, digest: str, limit: int) -> bool:
        has_room: Document = {"$or": [{"token_count": {"$lt": limit}}, {"token_count": None}]}
        record: Document = {
            "display_name": token.display_name,
            "digest": digest,
            "created_at": token.created_at,
            "expires_at": token.expires_at,
            "last_used_at": None,
        }
        result = await self._accounts.update_one(
            {"_id": _object_id(token.service_account_id), **has_room},
            {"$set": {f"tokens.{token.id}": record}, "$inc": {"token_count": 1}},
        )
        return result.matched_count == 1

    @storage_call
    async def tokens(self, client_id: str) -> list[ServiceAccountToken] | None:
        document = await self._accounts.find_one({"_id": _object_id(client_id)}, {"tokens": 1})
        if document is None:
            return None
        records: Document = document.get("tokens") or {}
        tokens = [_token_from_record(client_id, token_id, record) for token_id, record in records.items()]
        return sorted(tokens, key=lambda token: (token.created_at, token.id))

    @storage_call
    async def token_holder(self, client_id: str, token_id: str) -> TokenHolder | None:
        # One read whether or not the token is there: an unknown token costs what a revoked one does.
        document = await self._accounts.find_one(
            {"_id": _object_id(client_id)}, {"name": 1, "created_at": 1, "permissions": 1, f"tokens.{token_id}": 1}
        )
        if document is None:
            return None
        record = (document.get("tokens") or {}).get(token_id)
        return TokenHolder(
            account=_service_account_from_document(document),
            token=None if record is None else _token_from_record(client_id, token_id, record),
            digest=None if record is None else str(record["digest"]),
        )

    @storage_call
    async def revoke_token(self, client_id: str, token_id: str) -> bool:
        result = await self._accounts.update_one(
            {"_id": _object_id(client_id), f"tokens.{token_id}": {"$exists": True}},
            {"$unset": {f"tokens.{token_id}": ""}, "$inc": {"token_count": -1}},
        )
        return result.matched_count == 1

    @storage_call
    async def record_token_use(self, client_id: str, token_id: str, now: datetime) -> None:
        await self._accounts.update_one(
            {"_id": _object_id(client_id), f"tokens.{token_id}": {"$exists": True}},
            {"$set": {f"tokens.{token_id}.last_used_at": now}},
        )


def _token_from_record(client_id: str, token_id: str, record: Document) -> ServiceAccountToken:
    return ServiceAccountToken(
        id=token_id,
        service_account_id=client_id,
        display_name=record["display_name"],
        created_at=record["created_at"],
        expires_at=record.get("expires_at"),
        last_used_at=record.get("last_used_at"),
    )


def _service_account_from_document(document: Document) -> ServiceAccount:
    return ServiceAccount(
        client_id=str(document["_id"]),
        name=document["name"],
        created_at=document["created_at"],
        # Absent from accounts made before permissions existed: none.
        permissions=frozenset(ServiceAccountPermission(value) for value in document.get("permissions", ())),
    )
