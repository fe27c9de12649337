"""The mail ``outbox`` collection, bodies sealed at rest."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import bson
from bson import ObjectId
from cryptography.exceptions import InvalidTag
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.domain.model import Mail, QueuedMail


class MongoOutbox:
    """The ``outbox`` collection: mail waits here until a sender, in any replica, delivers it.

    Bodies (which may hold a code or a reset token) are stored sealed with AES-GCM under a key
    derived from the key-encryption key, the mail's id, recipient and subject bound in as
    associated data: a copy of the database reads no body, and a body moved to another mail
    does not open. Senders get the opened body; the services never see the difference.
    """

    def __init__(self, database: AsyncDatabase[Document], secrets: SecretsAtRest) -> None:
        self._outbox: AsyncCollection[Document] = database["outbox"]
        self._users: AsyncCollection[Document] = database["users"]  # only for mail queued before notice_of
        self._secrets = secrets

    @storage_call
    async def ensure_indexes(self) -> None:
        await self._outbox.create_index(
            [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="status_next_attempt_at"
        )
        # Serves housekeeping's purge of failed mail.
        await self._outbox.create_index([("status", ASCENDING), ("failed_at", ASCENDING)], name="status_failed_at")

    @storage_call
    async def seal_legacy_mail(self) -> int:
        """Seal the bodies of mail queued before bodies were sealed, and date those given up before
        failures were dated (by the end of their last attempt), so housekeeping drops them too.

        Run at start; the outbox is small (mail leaves it on delivery). How many it sealed.
        """
        sealed = 0
        async for document in self._outbox.find({"body": {"$exists": True}}):
            fields: Document = {
                "sealed_body": self._secrets.seal_mail_body(
                    document["body"], _mail_associated_data(document["_id"], document["to"], document["subject"])
                )
            }
            if document.get("status") == "failed" and document.get("failed_at") is None:
                fields["failed_at"] = document["next_attempt_at"]
            result = await self._outbox.update_one(
                {"_id": document["_id"], "body": {"$exists": True}}, {"$set": fields, "$unset": {"body": ""}}
            )
            sealed += result.modified_count
        return sealed

    @storage_call
    async def enqueue(
        self, mail: Mail, now: datetime, *, mail_id: str | None = None, notice_of: str | None = None
    ) -> None:
        """Queue ``mail``; with a ``mail_id`` (a notice's), queueing it again while queued does nothing."""
        object_id = ObjectId() if mail_id is None else ObjectId(mail_id)
        try:
            await self._outbox.insert_one(
                {
                    "_id": object_id,
                    "to": mail.to,
                    "subject": mail.subject,
                    "sealed_body": self._secrets.seal_mail_body(
                        _packed_body(mail), _mail_associated_data(object_id, mail.to, mail.subject)
                    ),
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "notice_of": None if notice_of is None else ObjectId(notice_of),
                }
            )
        except DuplicateKeyError:
            if mail_id is None:
                raise

    @storage_call
    async def claim(self, now: datetime, lease_seconds: float) -> QueuedMail | None:
        while True:
            document = await self._outbox.find_one_and_update(
                # "sending" past its lease: a sender died mid-delivery, so the mail may go out twice, never zero times.
                {"status": {"$in": ["pending", "sending"]}, "next_attempt_at": {"$lte": now}},
                {
                    "$set": {"status": "sending", "next_attempt_at": now + timedelta(seconds=lease_seconds)},
                    "$inc": {"attempts": 1},
                },
                sort=[("next_attempt_at", ASCENDING)],
                return_document=ReturnDocument.AFTER,
            )
            if document is None:
                return None
            mail = self._opened(document)
            if mail is not None:
                return QueuedMail(
                    id=str(document["_id"]),
                    mail=mail,
                    attempts=document["attempts"],
                    notice_of=await self._notice_owner(document),
                )
            # Tampered with, or sealed under another key-encryption key: it can never go out.
            await self.give_up(str(document["_id"]), "the sealed body does not open", now)

    async def _notice_owner(self, document: Document) -> str | None:
        if "notice_of" in document:
            return None if document["notice_of"] is None else str(document["notice_of"])
        # Queued by a version that did not record it: the user whose document still holds the
        # notice, if any (the pending_mail_id index serves this on MongoDB).
        owner = await self._users.find_one({"pending_mail.id": document["_id"]}, projection={"_id": 1})
        return None if owner is None else str(owner["_id"])

    @storage_call
    async def reseal_bodies(self) -> tuple[int, int, int]:
        """Seal every body under the current key-encryption key, each by a compare-and-set on its
        sealed value (a body changed meanwhile is read again). The outbox is small: mail leaves it
        on delivery. Returns how many were re-sealed, already current, and opened by no key."""
        resealed = current = unopenable = 0
        async for document in self._outbox.find(
            {"sealed_body": {"$exists": True}}, {"sealed_body": 1, "to": 1, "subject": 1}
        ):
            associated_data = _mail_associated_data(document["_id"], document["to"], document["subject"])
            sealed = bytes(document["sealed_body"])
            while True:
                try:
                    new = self._secrets.reseal_mail_body(sealed, associated_data)
                except InvalidTag:
                    unopenable += 1
                    break
                if new is None:
                    current += 1
                    break
                result = await self._outbox.update_one(
                    {"_id": document["_id"], "sealed_body": sealed}, {"$set": {"sealed_body": new}}
                )
                if result.modified_count == 1:
                    resealed += 1
                    break
                again = await self._outbox.find_one({"_id": document["_id"]}, {"sealed_body": 1})
                if again is None:  # delivered meanwhile
                    break
                sealed = bytes(again["sealed_body"])
        return resealed, current, unopenable

    def _opened(self, document: Document) -> Mail | None:
        to, subject = document["to"], document["subject"]
        if "body" in document:  # queued before bodies were sealed
            return Mail(to=to, subject=subject, body=document["body"])
        try:
            body = self._secrets.open_mail_body(
                bytes(document["sealed_body"]), _mail_associated_data(document["_id"], to, subject)
            )
        except (InvalidTag, KeyError, UnicodeDecodeError):
            return None
        text, html = _unpacked_body(body)
        return Mail(to=to, subject=subject, body=text, html=html)

    @storage_call
    async def delivered(self, mail_id: str) -> None:
        # Deleted, not kept: the body may hold a code, which must not outlive its delivery.
        await self._outbox.delete_one({"_id": _object_id(mail_id)})

    @storage_call
    async def retry_later(self, mail_id: str, at: datetime, error: str) -> None:
        await self._outbox.update_one(
            {"_id": _object_id(mail_id)},
            {"$set": {"status": "pending", "next_attempt_at": at, "last_error": error}},
        )

    @storage_call
    async def postpone(self, mail_id: str, at: datetime) -> None:
        await self._outbox.update_one(
            {"_id": _object_id(mail_id)},
            # The claim counted an attempt that was never made.
            {"$set": {"status": "pending", "next_attempt_at": at}, "$inc": {"attempts": -1}},
        )

    @storage_call
    async def give_up(self, mail_id: str, error: str, now: datetime) -> None:
        await self._outbox.update_one(
            {"_id": _object_id(mail_id)},
            {"$set": {"status": "failed", "failed_at": now, "last_error": error}},
        )

    @storage_call
    async def counts(self) -> tuple[int, int, datetime | None]:
        """Mail waiting, mail given up, and when the oldest waiting mail was queued (for metrics).

        Each query selects on ``status``, the first field of an index; delivered mail is deleted,
        so only the waiting mail is read to find the oldest.
        """
        waiting = {"status": {"$in": ["pending", "sending"]}}
        pending = await self._outbox.count_documents(waiting)
        failed = await self._outbox.count_documents({"status": "failed"})
        oldest = await self._outbox.find_one(waiting, {"created_at": 1}, sort=[("created_at", ASCENDING)])
        return pending, failed, None if oldest is None else oldest.get("created_at")


# A sealed body with an HTML part starts with this: a text body, all that was queued before,
# never holds a NUL. One sealed value keeps sealing, re-sealing and opening as they were.
_PARTS_MARK = "\0parts-v1\0"


def _packed_body(mail: Mail) -> str:
    if mail.html is None:
        return mail.body
    return _PARTS_MARK + json.dumps({"text": mail.body, "html": mail.html})


def _unpacked_body(sealed_text: str) -> tuple[str, str | None]:
    if not sealed_text.startswith(_PARTS_MARK):
        return sealed_text, None
    parts = json.loads(sealed_text[len(_PARTS_MARK) :])
    return str(parts["text"]), str(parts["html"])


def _mail_associated_data(mail_id: ObjectId, to: str, subject: str) -> bytes:
    """What a sealed body belongs to: its mail's id, recipient and subject, unambiguously encoded."""
    return bson.encode({"purpose": "outbox-mail", "id": mail_id, "to": to, "subject": subject})
