"""User metadata in the ``users`` collection (part of
:class:`users_grpc.adapters.mongo.users.MongoUserRepository`).

The entries live in the user's own document, not in a collection of their own: a write of the
set, its bounds (checked on the whole set the write stores), its etags and its change of the feed
are then one single-document update, atomic on MongoDB and on the embedded database alike, with
no transaction. The set is replaced whole, conditional on ``metadata_revision``: FerretDB 1.24
has no ``arrayFilters`` and no ``$pull`` by condition, and a whole-set write keeps the code the
same on both. docs/scaling.md says what that means for a sharded ``users``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pymongo import ASCENDING

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.adapters.mongo.metadata_bson import (
    _metadata_document,
    _metadata_from_document,
    _metadata_keys_document,
)
from users_grpc.adapters.mongo.users_base import UsersCollection
from users_grpc.adapters.mongo.users_bson import _LIVE, _with_change
from users_grpc.domain.metadata import MetadataEntry, MetadataKey, StoredMetadata
from users_grpc.domain.model import ChangeType


class MetadataUpdates(UsersCollection):
    """Reading and replacing a user's metadata entries."""

    async def _ensure_metadata_indexes(self) -> None:
        # ListUsers by metadata: a key and value, or a key present (see metadata_bson); each walks
        # its entries in _id order, as the keyset pages. Multikey: metadata is an array.
        await self._users.create_index([("metadata.skv", ASCENDING), ("_id", ASCENDING)], name="metadata_skv_id")
        await self._users.create_index([("metadata.sk", ASCENDING), ("_id", ASCENDING)], name="metadata_sk_id")

    @storage_call
    async def metadata_of(self, user_id: str) -> StoredMetadata | None:
        document = await self._users.find_one(
            {"_id": _object_id(user_id), **_LIVE}, projection={"metadata": 1, "metadata_revision": 1}
        )
        if document is None:
            return None
        return StoredMetadata(_metadata_from_document(document), int(document.get("metadata_revision", 0)))

    @storage_call
    async def replace_metadata(
        self, user_id: str, read: StoredMetadata, entries: tuple[MetadataEntry, ...], changed: MetadataKey
    ) -> bool:
        # Documents that never had metadata have no revision: revision 0.
        revision: object = read.revision if read.revision else {"$exists": False}
        update = _with_change(
            {"$set": {"metadata": _metadata_document(entries)}, "$inc": {"metadata_revision": 1}},
            ChangeType.METADATA_CHANGED,
            datetime.now(UTC),
        )
        # The feed's entry names the key changed (the publisher copies it into the change).
        update["$push"]["pending_changes"]["metadata_keys"] = _metadata_keys_document((changed,))
        query: Document = {"_id": _object_id(user_id), "metadata_revision": revision, **_LIVE}
        result = await self._users.update_one(query, update)
        if result.modified_count != 1:
            return False
        await self._publish(query["_id"])
        return True
