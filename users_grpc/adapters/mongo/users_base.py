"""What the concerns of :class:`users_grpc.adapters.mongo.users.MongoUserRepository` share."""

from __future__ import annotations

import logging
from datetime import datetime

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure, PyMongoError

from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.claims import Claim, MongoClaims
from users_grpc.adapters.mongo.documents import Document, _is_duplicate_key
from users_grpc.domain.errors import AlreadyExists, StorageUnavailable

log = logging.getLogger(__name__)


class UsersCollection:
    """The ``users`` collection, the name claims and the change log, as every concern of
    :class:`~users_grpc.adapters.mongo.users.MongoUserRepository` uses them; the repository sets them."""

    _users: AsyncCollection[Document]
    _claims: MongoClaims
    _changes: MongoChangeLog

    async def _find_by_identifier(self, identifier_key: str) -> Document | None:
        raise NotImplementedError  # the repository's own (users.py)

    async def _publish(self, user_id: ObjectId | str) -> None:
        """Publish the user's pending changes now, the fast path; the change log's sweep publishes
        whatever this leaves (the database went away, the call was cut short, the server died)."""
        try:
            await self._changes.publish(str(user_id))
        except (PyMongoError, StorageUnavailable):
            log.warning("changes left for the sweep", extra={"user_id": str(user_id)}, exc_info=True)

    async def _claimed_update(
        self, kind: str, key: str, query: Document, update: Document, now: datetime
    ) -> Document | None:
        """Claim ``key`` for the user ``query`` names, apply ``update`` where ``query`` holds, then
        release the key the user held before; the document before the update, or None if
        ``query`` matched nothing (the claim is then given back)."""
        user_id = query["_id"]
        claim = await self._claims.claim(kind, key, user_id, now)
        if claim is None:
            raise AlreadyExists(kind)
        refused = False
        try:
            before = await self._users.find_one_and_update(query, update, return_document=ReturnDocument.BEFORE)
        except OperationFailure as error:
            if not _is_duplicate_key(error):
                raise
            before, refused = None, True  # a unique index left from schema 1 refused it
        if before is None:
            if claim is Claim.NEW:
                await self._claims.release(kind, key, user_id)
            if refused:
                raise AlreadyExists(kind)
            return None
        await self._claims.settle(kind, key, user_id)
        if before.get(f"{kind}_key") != key:
            await self._claims.release(kind, before[f"{kind}_key"], user_id)
        return before
