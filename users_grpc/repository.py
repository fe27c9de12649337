"""MongoDB storage through PyMongo's asyncio client; BSON stays inside this module.

Every state change is one conditional single-document update, with its
precondition in the filter, so concurrent requests and several replicas need
no transactions (FerretDB has none, and MongoDB needs none for this).

A change that the user must hear of (a password reset or change, MFA on or
off) pushes its notice into the user's own document in that same update: a
transactional outbox inside the aggregate. The mail sender moves pending
notices into the ``outbox`` collection (:meth:`MongoUserRepository.claim_pending_notices`).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import pymongo
from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError

from users_grpc.domain import (
    Account,
    ActivationCode,
    Gender,
    Mail,
    Mfa,
    NewUser,
    Notice,
    PendingNotices,
    QueuedMail,
    Role,
    Session,
    StoredKey,
    User,
    identifier_key,
)
from users_grpc.errors import AlreadyExists, StorageUnavailable

Document = dict[str, Any]
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _storage_errors(method: Callable[_P, Coroutine[Any, Any, _R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Turn an unreachable or timed-out database into :class:`StorageUnavailable`.

    Other PyMongo errors are bugs and propagate as they are.
    """

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except PyMongoError as error:
            if isinstance(error, ConnectionFailure) or error.timeout:
                raise StorageUnavailable() from error
            raise

    return wrapper


class MongoUserRepository:
    """The ``users`` collection. Uniqueness rests on the ``*_key`` fields' unique indexes."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._users: AsyncCollection[Document] = database["users"]

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._users.create_index([("username_key", ASCENDING)], unique=True, name="username_key_unique")
        await self._users.create_index([("email_key", ASCENDING)], unique=True, name="email_key_unique")
        await self._users.create_index([("password_reset.digest", ASCENDING)], name="password_reset_digest")
        # Sparse: only the few documents with notices waiting are indexed, and the senders'
        # queries (a date range; a notice id) are served by them.
        await self._users.create_index([("pending_mail_since", ASCENDING)], sparse=True, name="pending_mail_since")
        await self._users.create_index([("pending_mail.id", ASCENDING)], sparse=True, name="pending_mail_id")

    @_storage_errors
    async def add(self, new_user: NewUser) -> User:
        document = _document_from_new_user(new_user)
        try:
            result = await self._users.insert_one(document)
        except DuplicateKeyError as error:
            raise AlreadyExists(await self._taken_field(document, error)) from None
        document["_id"] = result.inserted_id
        return _user_from_document(document)

    @_storage_errors
    async def get(self, user_id: str) -> User | None:
        document = await self._users.find_one({"_id": ObjectId(user_id)})
        return None if document is None else _user_from_document(document)

    @_storage_errors
    async def find_account(self, identifier_key: str) -> Account | None:
        document = await self._users.find_one(_identifier_filter(identifier_key))
        return None if document is None else _account_from_document(document)

    @_storage_errors
    async def reserve_activation_attempt(self, user_id: str, now: datetime) -> ActivationCode | None:
        document = await self._users.find_one_and_update(
            {
                "_id": ObjectId(user_id),
                "is_active": False,
                "activation.expires_at": {"$gt": now},
                "activation.attempts_left": {"$gt": 0},
            },
            {"$inc": {"activation.attempts_left": -1}},
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else _activation_from_document(document["activation"])

    @_storage_errors
    async def activate(self, user_id: str, code_digest: str, now: datetime) -> User | None:
        document = await self._users.find_one_and_update(
            {
                "_id": ObjectId(user_id),
                "is_active": False,
                "activation.digest": code_digest,
                "activation.expires_at": {"$gt": now},
            },
            {"$set": {"is_active": True, "updated_at": now}, "$unset": {"activation": ""}},
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else _user_from_document(document)

    @_storage_errors
    async def replace_activation_code(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        return await self._replace_code("activation", {"is_active": False}, user_id, code, max_sends, window_seconds)

    @_storage_errors
    async def replace_password_reset(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        return await self._replace_code("password_reset", {"is_active": True}, user_id, code, max_sends, window_seconds)

    async def _replace_code(
        self,
        field: str,
        precondition: Document,
        user_id: str,
        code: ActivationCode,
        max_sends: int,
        window_seconds: int,
    ) -> bool:
        """Pend ``code`` in ``field``, replacing any older one, unless the sends in the window hit the cap."""
        window_cutoff = code.window_started_at - timedelta(seconds=window_seconds)
        pending = {"_id": ObjectId(user_id), **precondition}
        # Within the running window: count one more send, if the cap allows.
        counted = await self._users.update_one(
            {
                **pending,
                f"{field}.window_started_at": {"$gt": window_cutoff},
                f"{field}.sends_in_window": {"$lt": max_sends},
            },
            {
                "$set": {
                    f"{field}.digest": code.digest,
                    f"{field}.expires_at": code.expires_at,
                    f"{field}.attempts_left": code.attempts_left,
                },
                "$inc": {f"{field}.sends_in_window": 1},
            },
        )
        if counted.modified_count:
            return True
        # The window has run out (or there was none): this send opens a new one.
        opened = await self._users.update_one(
            {**pending, "$or": [{f"{field}.window_started_at": {"$lte": window_cutoff}}, {field: None}]},
            {"$set": {field: _activation_document(code)}},
        )
        return opened.modified_count == 1

    @_storage_errors
    async def find_account_by_reset_digest(self, digest: str, now: datetime) -> Account | None:
        document = await self._users.find_one(
            {"password_reset.digest": digest, "password_reset.expires_at": {"$gt": now}, "is_active": True}
        )
        return None if document is None else _account_from_document(document)

    @_storage_errors
    async def reset_password(self, user_id: str, digest: str, password_hash: str, now: datetime, notice: Mail) -> bool:
        """Set the password if this reset token is still pending and unexpired; it works once.

        ``notice`` is pended in the same update: the reset and its notice happen together or not at all.
        """
        result = await self._users.update_one(
            {"_id": ObjectId(user_id), "password_reset.digest": digest, "password_reset.expires_at": {"$gt": now}},
            _with_notice(
                {
                    "$set": {"password_hash": password_hash, "updated_at": now},
                    "$unset": {"password_reset": ""},
                    "$inc": {"token_version": 1},
                },
                notice,
                now,
            ),
        )
        return result.modified_count == 1

    @_storage_errors
    async def set_password(self, user_id: str, password_hash: str, now: datetime, notice: Mail) -> bool:
        """Set a new password, with its notice; a pending reset token dies with the old password."""
        result = await self._users.update_one(
            {"_id": ObjectId(user_id)},
            _with_notice(
                {
                    "$set": {"password_hash": password_hash, "updated_at": now},
                    "$unset": {"password_reset": ""},
                    "$inc": {"token_version": 1},
                },
                notice,
                now,
            ),
        )
        return result.modified_count == 1

    @_storage_errors
    async def get_account(self, user_id: str) -> Account | None:
        document = await self._users.find_one({"_id": ObjectId(user_id)})
        return None if document is None else _account_from_document(document)

    @_storage_errors
    async def start_mfa_enrollment(self, user_id: str, sealed_secret: bytes, now: datetime) -> bool:
        """Pend a new TOTP secret unless MFA is already on."""
        result = await self._users.update_one(
            {"_id": ObjectId(user_id), "mfa.state": {"$ne": "active"}},
            {
                "$set": {
                    "mfa": {
                        "state": "pending",
                        "sealed_secret": sealed_secret,
                        "last_used_step": -1,
                        "recovery_digests": [],
                        "failures": 0,
                        "failure_window_start": None,
                    },
                    "updated_at": now,
                }
            },
        )
        return result.modified_count == 1

    @_storage_errors
    async def confirm_mfa(
        self, user_id: str, step: int, recovery_digests: list[str], now: datetime, notice: Mail
    ) -> bool:
        """Turn a pending enrollment on, with its notice, if ``step`` is newer than the last used."""
        result = await self._users.update_one(
            {"_id": ObjectId(user_id), "mfa.state": "pending", "mfa.last_used_step": {"$lt": step}},
            _with_notice(
                {
                    "$set": {
                        "mfa.state": "active",
                        "mfa.last_used_step": step,
                        "mfa.recovery_digests": recovery_digests,
                        "mfa.failures": 0,
                        "updated_at": now,
                    },
                    "$inc": {"token_version": 1},
                },
                notice,
                now,
            ),
        )
        return result.modified_count == 1

    @_storage_errors
    async def use_totp_step(self, user_id: str, step: int) -> bool:
        """Record ``step`` as used if it is newer than the last one: each code works once."""
        result = await self._users.update_one(
            {"_id": ObjectId(user_id), "mfa.state": "active", "mfa.last_used_step": {"$lt": step}},
            {"$set": {"mfa.last_used_step": step, "mfa.failures": 0}},
        )
        return result.modified_count == 1

    @_storage_errors
    async def use_recovery_code(self, user_id: str, digest: str) -> bool:
        result = await self._users.update_one(
            {"_id": ObjectId(user_id), "mfa.state": "active", "mfa.recovery_digests": digest},
            {"$pull": {"mfa.recovery_digests": digest}, "$set": {"mfa.failures": 0}},
        )
        return result.modified_count == 1

    @_storage_errors
    async def replace_recovery_codes(self, user_id: str, digests: list[str]) -> bool:
        result = await self._users.update_one(
            {"_id": ObjectId(user_id), "mfa.state": "active"}, {"$set": {"mfa.recovery_digests": digests}}
        )
        return result.modified_count == 1

    @_storage_errors
    async def disable_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        """Turn MFA off, with its notice; False if it was not on."""
        result = await self._users.update_one(
            {"_id": ObjectId(user_id), "mfa.state": "active"},
            _with_notice(
                {"$unset": {"mfa": ""}, "$set": {"updated_at": now}, "$inc": {"token_version": 1}},
                notice,
                now,
            ),
        )
        return result.modified_count == 1

    @_storage_errors
    async def reserve_mfa_attempt(self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int) -> bool:
        """Count one second-factor attempt; False once ``max_attempts`` fell in the window."""
        # Only within an enrollment: a counter alone must not make an "mfa" sub-document.
        return await self._reserve_attempt("mfa", user_id, now, max_attempts, window_seconds, {"mfa": {"$ne": None}})

    @_storage_errors
    async def reserve_password_attempt(
        self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int
    ) -> bool:
        """Count one password attempt; False once ``max_attempts`` fell in the window."""
        return await self._reserve_attempt("password_attempts", user_id, now, max_attempts, window_seconds)

    @_storage_errors
    async def clear_password_attempts(self, user_id: str) -> None:
        await self._users.update_one({"_id": ObjectId(user_id)}, {"$set": {"password_attempts.failures": 0}})

    async def _reserve_attempt(
        self,
        field: str,
        user_id: str,
        now: datetime,
        max_attempts: int,
        window_seconds: int,
        precondition: Document | None = None,
    ) -> bool:
        """Count an attempt in ``field`` (failures, failure_window_start) within a window, up to a cap.

        Counted before the secret is compared, so parallel guesses cannot exceed the cap; a
        success sets failures back to 0.
        """
        cutoff = now - timedelta(seconds=window_seconds)
        counted = await self._users.update_one(
            {
                "_id": ObjectId(user_id),
                f"{field}.failure_window_start": {"$gt": cutoff},
                f"{field}.failures": {"$lt": max_attempts},
            },
            {"$inc": {f"{field}.failures": 1}},
        )
        if counted.modified_count:
            return True
        # The window ran out, or none was open yet: this attempt opens one.
        opened = await self._users.update_one(
            {
                "_id": ObjectId(user_id),
                **(precondition or {}),
                "$or": [{f"{field}.failure_window_start": {"$lte": cutoff}}, {f"{field}.failure_window_start": None}],
            },
            {"$set": {f"{field}.failures": 1, f"{field}.failure_window_start": now}},
        )
        return opened.modified_count == 1

    @_storage_errors
    async def delete(self, user_id: str) -> bool:
        result = await self._users.delete_one({"_id": ObjectId(user_id)})
        return result.deleted_count == 1

    @_storage_errors
    async def delete_by_identifier(self, identifier_key: str) -> bool:
        result = await self._users.delete_one(_identifier_filter(identifier_key))
        return result.deleted_count == 1

    @_storage_errors
    async def bump_token_version(self, user_id: str, now: datetime) -> None:
        """End every access token so far, and any pending password-reset token with them."""
        await self._users.update_one(
            {"_id": ObjectId(user_id)},
            {"$inc": {"token_version": 1}, "$set": {"updated_at": now}, "$unset": {"password_reset": ""}},
        )

    @_storage_errors
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

    @_storage_errors
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

    @_storage_errors
    async def settle_notice(self, notice_id: str, now: datetime) -> datetime | None:
        """Before its outbox copy goes out: make sure the notice no longer waits in its user's document.

        Otherwise a sender that moved it, then died before dropping it, would leave it to be moved
        (and mailed) again once its outbox copy is gone. None when settled; else the time until
        which a live claim holds the notice (its sender is moving it; try again then).
        """
        notice = ObjectId(notice_id)
        # Twice at most: a sender may claim the document between the read and the pull.
        for _ in range(2):
            document = await self._users.find_one(
                {"pending_mail.id": notice}, projection={"pending_mail": 1, "pending_mail_claim": 1}
            )
            if document is None:
                return None  # the common case: moved and dropped already, or not a notice at all
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

    async def _taken_field(self, document: Document, error: DuplicateKeyError) -> str:
        # MongoDB names the clashing index in keyPattern; FerretDB does not, so look it up.
        key_pattern = (error.details or {}).get("keyPattern") or {}
        if "username_key" in key_pattern:
            return "username"
        if "email_key" in key_pattern:
            return "email"
        if await self._users.find_one({"username_key": document["username_key"]}, projection={"_id": 1}):
            return "username"
        return "email"


class MongoSessionRepository:
    """The ``sessions`` collection: one document per session, holding its current refresh-token digest."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._sessions: AsyncCollection[Document] = database["sessions"]

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._sessions.create_index([("token_digest", ASCENDING)], unique=True, name="token_digest_unique")
        await self._sessions.create_index([("used_digests", ASCENDING)], name="used_digests")
        await self._sessions.create_index([("user_id", ASCENDING)], name="user_id")

    @_storage_errors
    async def create(
        self, user_id: str, token_digest: str, now: datetime, expires_at: datetime, token_version: int
    ) -> Session:
        document: Document = {
            "user_id": user_id,
            "token_version": token_version,
            "token_digest": token_digest,
            "used_digests": [],
            "created_at": now,
            "last_used_at": now,
            "expires_at": expires_at,
            "revoked_at": None,
        }
        result = await self._sessions.insert_one(document)
        document["_id"] = result.inserted_id
        return _session_from_document(document)

    @_storage_errors
    async def rotate(self, token_digest: str, new_token_digest: str, now: datetime) -> Session | None:
        document = await self._sessions.find_one_and_update(
            {"token_digest": token_digest, "revoked_at": None, "expires_at": {"$gt": now}},
            {
                "$set": {"token_digest": new_token_digest, "last_used_at": now},
                "$push": {"used_digests": token_digest},
            },
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else _session_from_document(document)

    @_storage_errors
    async def revoke_family_of_used(self, token_digest: str, now: datetime) -> bool:
        result = await self._sessions.update_one(
            {"used_digests": token_digest, "revoked_at": None}, {"$set": {"revoked_at": now}}
        )
        return result.modified_count == 1

    @_storage_errors
    async def revoke(self, token_digest: str, now: datetime) -> None:
        await self._sessions.update_one(
            {"token_digest": token_digest, "revoked_at": None}, {"$set": {"revoked_at": now}}
        )

    @_storage_errors
    async def list_active(self, user_id: str, now: datetime) -> list[Session]:
        cursor = self._sessions.find({"user_id": user_id, "revoked_at": None, "expires_at": {"$gt": now}})
        documents = await cursor.sort("created_at", -1).to_list()
        return [_session_from_document(document) for document in documents]

    @_storage_errors
    async def revoke_all(self, user_id: str, now: datetime) -> None:
        await self._sessions.update_many({"user_id": user_id, "revoked_at": None}, {"$set": {"revoked_at": now}})


class MongoKeyStore:
    """The ``signing_keys`` collection; private keys arrive and leave sealed."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._keys: AsyncCollection[Document] = database["signing_keys"]

    @_storage_errors
    async def add(self, key: StoredKey) -> None:
        await self._keys.insert_one(
            {
                "_id": key.kid,
                "sealed_private_key": key.sealed_private_key,
                "created_at": key.created_at,
                "retired_at": key.retired_at,
            }
        )

    @_storage_errors
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

    @_storage_errors
    async def retire(self, kid: str, now: datetime) -> bool:
        result = await self._keys.update_one({"_id": kid, "retired_at": None}, {"$set": {"retired_at": now}})
        return result.modified_count == 1


class MongoOutbox:
    """The ``outbox`` collection: mail waits here until a sender, in any replica, delivers it."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._outbox: AsyncCollection[Document] = database["outbox"]

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._outbox.create_index(
            [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="status_next_attempt_at"
        )

    @_storage_errors
    async def enqueue(self, mail: Mail, now: datetime, *, mail_id: str | None = None) -> None:
        """Queue ``mail``; with a ``mail_id`` (a notice's), queueing it again while queued does nothing."""
        document: Document = {
            "to": mail.to,
            "subject": mail.subject,
            "body": mail.body,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        if mail_id is not None:
            document["_id"] = ObjectId(mail_id)
        try:
            await self._outbox.insert_one(document)
        except DuplicateKeyError:
            if mail_id is None:
                raise

    @_storage_errors
    async def claim(self, now: datetime, lease_seconds: float) -> QueuedMail | None:
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
        return QueuedMail(
            id=str(document["_id"]),
            mail=Mail(to=document["to"], subject=document["subject"], body=document["body"]),
            attempts=document["attempts"],
        )

    @_storage_errors
    async def delivered(self, mail_id: str) -> None:
        # Deleted, not kept: the body may hold a code, which must not outlive its delivery.
        await self._outbox.delete_one({"_id": ObjectId(mail_id)})

    @_storage_errors
    async def retry_later(self, mail_id: str, at: datetime, error: str) -> None:
        await self._outbox.update_one(
            {"_id": ObjectId(mail_id)},
            {"$set": {"status": "pending", "next_attempt_at": at, "last_error": error}},
        )

    @_storage_errors
    async def give_up(self, mail_id: str, error: str) -> None:
        await self._outbox.update_one(
            {"_id": ObjectId(mail_id)},
            {"$set": {"status": "failed", "last_error": error}},
        )


def _unclaimed(now: datetime) -> Document:
    """The filter for a user document whose notices no sender holds (a claim past its lease counts as none)."""
    return {"$or": [{"pending_mail_claim.until": {"$lte": now}}, {"pending_mail_claim": None}]}


def _live_claim(document: Document, now: datetime) -> datetime | None:
    until: datetime | None = (document.get("pending_mail_claim") or {}).get("until")
    return until if until is not None and until > now else None


def _with_notice(update: Document, notice: Mail, now: datetime) -> Document:
    """``update`` that also pends ``notice`` in the user's document (see the module docstring)."""
    return {
        **update,
        "$push": {"pending_mail": _notice_document(Notice(id=str(ObjectId()), mail=notice))},
        # The oldest waiting notice's time; a later push leaves it.
        "$min": {"pending_mail_since": now},
    }


def _notice_document(notice: Notice) -> Document:
    return {"id": ObjectId(notice.id), "to": notice.mail.to, "subject": notice.mail.subject, "body": notice.mail.body}


def _notice_from_document(document: Document) -> Notice:
    return Notice(
        id=str(document["id"]), mail=Mail(to=document["to"], subject=document["subject"], body=document["body"])
    )


def _identifier_filter(key: str) -> Document:
    return {"$or": [{"username_key": key}, {"email_key": key}]}


def _document_from_new_user(new_user: NewUser) -> Document:
    return {
        "username": new_user.username,
        "username_key": identifier_key(new_user.username),
        "first_name": new_user.first_name,
        "last_name": new_user.last_name,
        "email": new_user.email,
        "email_key": identifier_key(new_user.email),
        "gender": new_user.gender.value,
        "role": new_user.role.value,
        "is_active": new_user.is_active,
        "password_hash": new_user.password_hash,
        "activation": None if new_user.activation is None else _activation_document(new_user.activation),
        "created_at": new_user.created_at,
        "updated_at": new_user.created_at,
        "token_version": 0,
    }


def _activation_document(code: ActivationCode) -> Document:
    return {
        "digest": code.digest,
        "expires_at": code.expires_at,
        "attempts_left": code.attempts_left,
        "sends_in_window": code.sends_in_window,
        "window_started_at": code.window_started_at,
    }


def _user_from_document(document: Document) -> User:
    return User(
        id=str(document["_id"]),
        username=document["username"],
        first_name=document["first_name"],
        last_name=document["last_name"],
        email=document["email"],
        gender=Gender(document["gender"]),
        role=Role(document["role"]),
        is_active=document["is_active"],
        created_at=document["created_at"],
        updated_at=document["updated_at"],
        token_version=document.get("token_version", 0),
        mfa_enabled=(document.get("mfa") or {}).get("state") == "active",
    )


def _session_from_document(document: Document) -> Session:
    return Session(
        id=str(document["_id"]),
        user_id=document["user_id"],
        created_at=document["created_at"],
        last_used_at=document["last_used_at"],
        expires_at=document["expires_at"],
        token_version=document.get("token_version", 0),
    )


def _account_from_document(document: Document) -> Account:
    activation = document.get("activation")
    password_reset = document.get("password_reset")
    mfa = document.get("mfa")
    return Account(
        user=_user_from_document(document),
        password_hash=document["password_hash"],
        activation=None if activation is None else _activation_from_document(activation),
        password_reset=None if password_reset is None else _activation_from_document(password_reset),
        mfa=None
        if mfa is None
        else Mfa(
            active=mfa["state"] == "active",
            sealed_secret=bytes(mfa["sealed_secret"]),
            last_used_step=mfa["last_used_step"],
            recovery_digests=tuple(mfa["recovery_digests"]),
        ),
    )


def _activation_from_document(activation: Document) -> ActivationCode:
    return ActivationCode(
        digest=activation["digest"],
        expires_at=activation["expires_at"],
        attempts_left=activation["attempts_left"],
        sends_in_window=activation["sends_in_window"],
        window_started_at=activation["window_started_at"],
    )


async def ping(database: AsyncDatabase[Document], timeout_seconds: float) -> bool:
    """True if the database answers a ping within ``timeout_seconds``."""
    try:
        with pymongo.timeout(timeout_seconds):
            await database.command("ping")
    except PyMongoError:
        return False
    return True
