"""The database's layout: THE index list (:func:`ensure_indexes`), the identifier indexes, whose form
depends on the schema version, and the ``schema`` collection that records the version.

Each index is made beside the queries it serves, in its store's ``ensure_indexes``; this module
lists the stores, so that the server (at start-up, :mod:`users_grpc.bootstrap`) and the tests
(``tests/support/stores.py``) make the same set. The migrations (:mod:`users_grpc.ops.migrations`)
make and replace the identifier indexes through :class:`MongoSchema`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.claims import MongoClaims
from users_grpc.adapters.mongo.documents import _INDEX_NOT_FOUND, Document

if TYPE_CHECKING:
    from users_grpc.adapters.mongo.audit_trail import MongoAuditTrail
    from users_grpc.adapters.mongo.groups import MongoGroupRepository
    from users_grpc.adapters.mongo.outbox import MongoOutbox
    from users_grpc.adapters.mongo.service_accounts import MongoServiceAccountRepository
    from users_grpc.adapters.mongo.sessions import MongoSessionRepository
    from users_grpc.adapters.mongo.throttles import MongoThrottleStore
    from users_grpc.adapters.mongo.users import MongoUserRepository


async def ensure_indexes(
    *,
    users: MongoUserRepository,
    outbox: MongoOutbox,
    sessions: MongoSessionRepository,
    throttles: MongoThrottleStore,
    service_accounts: MongoServiceAccountRepository,
    audit_trail: MongoAuditTrail,
    groups: MongoGroupRepository,
) -> None:
    """Make every index that every schema version has: each store's (the users' own include the
    claims' and the change log's). The identifier indexes follow the version: see
    :func:`users_grpc.ops.migrations.prepare`."""
    for store in (users, outbox, sessions, throttles, service_accounts, audit_trail, groups):
        await store.ensure_indexes()


class MongoSchema:
    """The ``schema`` collection: which version of this module's layout the database holds, and the
    progress of a migration under way. See :mod:`users_grpc.ops.migrations`."""

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
