"""The notices waiting in users' documents, claimed on their way to the outbox (part of
:class:`users_grpc.adapters.mongo.users.MongoUserRepository`)."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.adapters.mongo.users_base import UsersCollection
from users_grpc.adapters.mongo.users_bson import _notice_document, _notice_from_document
from users_grpc.domain.model import PendingNotices


class NoticeUpdates(UsersCollection):
    """Claiming and settling the notices pended in users' documents."""

    @storage_call
    async def claim_pending_notices(self, now: datetime, lease_seconds: float) -> PendingNotices | None:
        """Claim, for ``lease_seconds``, the notices waiting in one user's document; None if none wait.

        A claim keeps other senders off this document's notices until it is released or its
        lease runs out (its sender died): then another sender takes them over.
        """
        claim = secrets.token_hex(16)
        document = await self._users.find_one_and_update(
            {"pending_mail_since": {"$lte": now}, **_unclaimed(now)},
            {"$set": {"pending_mail_claim": {"token": claim, "until": now + timedelta(seconds=lease_seconds)}}},
            sort=[("pending_mail_since", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        if document is None:
            return None
        return PendingNotices(
            user_id=str(document["_id"]),
            claim=claim,
            notices=tuple(_notice_from_document(n) for n in document.get("pending_mail") or ()),
        )

    @storage_call
    async def release_notices(self, pending: PendingNotices) -> None:
        """Drop the claimed notices, which the outbox holds now, and end the claim."""
        user_id = ObjectId(pending.user_id)
        await self._users.update_one(
            {"_id": user_id, "pending_mail_claim.token": pending.claim},
            {
                # Whole elements, as written: FerretDB's $pull takes no conditions.
                "$pullAll": {"pending_mail": [_notice_document(n) for n in pending.notices]},
                "$unset": {"pending_mail_claim": ""},
            },
        )
        await self._drop_empty_notices(user_id)

    @storage_call
    async def settle_notice(self, user_id: str, notice_id: str, now: datetime) -> datetime | None:
        """Before its outbox copy goes out: make sure the notice no longer waits in its user's document.

        Otherwise a sender that moved it, then died before dropping it, would leave it to be moved
        (and mailed) again once its outbox copy is gone. None when settled; else the time until
        which a live claim holds the notice (its sender is moving it; try again then).
        """
        notice = _object_id(notice_id)
        # Twice at most: a sender may claim the document between the read and the pull.
        for _ in range(2):
            document = await self._users.find_one(
                {"_id": _object_id(user_id), "pending_mail.id": notice},
                projection={"pending_mail": 1, "pending_mail_claim": 1},
            )
            if document is None:
                return None  # the common case: moved and dropped already
            claimed_until = _live_claim(document, now)
            if claimed_until is not None:
                return claimed_until
            await self._users.update_one(
                {"_id": document["_id"], **_unclaimed(now)},
                {"$pullAll": {"pending_mail": [n for n in document["pending_mail"] if n.get("id") == notice]}},
            )
            await self._drop_empty_notices(document["_id"])
        return None

    async def _drop_empty_notices(self, user_id: ObjectId) -> None:
        # Conditional on emptiness in the same update: a notice pushed meanwhile keeps the fields.
        await self._users.update_one(
            {"_id": user_id, "pending_mail": {"$size": 0}}, {"$unset": {"pending_mail": "", "pending_mail_since": ""}}
        )


def _unclaimed(now: datetime) -> Document:
    """The filter for a user document whose notices no sender holds (a claim past its lease counts as none)."""
    return {"$or": [{"pending_mail_claim.until": {"$lte": now}}, {"pending_mail_claim": None}]}


def _live_claim(document: Document, now: datetime) -> datetime | None:
    until: datetime | None = (document.get("pending_mail_claim") or {}).get("until")
    return until if until is not None and until > now else None
