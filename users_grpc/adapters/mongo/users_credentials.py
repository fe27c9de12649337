"""Activation codes, passwords, password resets and changes of address in the ``users``
collection: each pends a code or checks one (part of :class:`users_grpc.adapters.mongo.users.MongoUserRepository`)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from pymongo import ReturnDocument

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.adapters.mongo.users_base import UsersCollection
from users_grpc.adapters.mongo.users_bson import (
    _LIVE,
    _NEVER_ACTIVATED,
    _account_from_document,
    _activation_document,
    _activation_from_document,
    _user_from_document,
    _with_change,
    _with_notice,
)
from users_grpc.domain.model import (
    Account,
    ActivationCode,
    ChangeType,
    Mail,
    PasswordHistory,
    PasswordScheme,
    PendingEmailChange,
    User,
    UserState,
    to_milliseconds,
)
from users_grpc.domain.rules import identifier_key


class CredentialUpdates(UsersCollection):
    """Activation, passwords, resets and changes of address."""

    @storage_call
    async def reserve_activation_attempt(self, user_id: str, now: datetime) -> ActivationCode | None:
        pending = await self._reserve_code_attempt("activation", {"is_active": False}, user_id, now)
        return None if pending is None else _activation_from_document(pending)

    @storage_call
    async def activate(self, user_id: str, code_digest: str, now: datetime) -> User | None:
        return await self._activate_if(
            user_id, {"activation.digest": code_digest, "activation.expires_at": {"$gt": now}}, now
        )

    @storage_call
    async def activate_with_token(self, user_id: str, token_digest: str, now: datetime) -> User | None:
        return await self._activate_if(
            user_id, {"activation.token_digest": token_digest, "activation.token_expires_at": {"$gt": now}}, now
        )

    async def _activate_if(self, user_id: str, proof: Document, now: datetime) -> User | None:
        """Activate a pending user if ``proof`` (an unexpired code or token) matches; works once."""
        document = await self._users.find_one_and_update(
            {"_id": _object_id(user_id), "is_active": False, **proof, **_LIVE},
            _with_change(
                {
                    "$set": {"is_active": True, "state": UserState.ACTIVE.value, "updated_at": now},
                    "$unset": {"activation": ""},
                },
                ChangeType.ACTIVATED,
                now,
            ),
            return_document=ReturnDocument.AFTER,
        )
        if document is None:
            return None
        await self._publish(document["_id"])
        return _user_from_document(document)

    @storage_call
    async def replace_activation_code(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        return await self._replace_code("activation", _NEVER_ACTIVATED, user_id, code, max_sends, window_seconds)

    @storage_call
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
        extra: Document | None = None,
        notice: Mail | None = None,
    ) -> bool:
        """Pend ``code`` in ``field``, replacing any older one, unless the sends in the window hit the cap.

        ``extra`` holds more fields of the pending ``field`` sub-document, set with the code;
        ``notice`` is pended in the same update (see :mod:`users_grpc.adapters.mongo`).
        """

        def noticed(update: Document) -> Document:
            return update if notice is None else _with_notice(update, notice, code.window_started_at)

        fields = {**_activation_document(code), **(extra or {})}
        window_cutoff = code.window_started_at - timedelta(seconds=window_seconds)
        pending = {"_id": _object_id(user_id), **precondition}
        # Within the running window: count one more send, if the cap allows.
        counted = await self._users.update_one(
            {
                **pending,
                f"{field}.window_started_at": {"$gt": window_cutoff},
                f"{field}.sends_in_window": {"$lt": max_sends},
            },
            noticed(
                {
                    "$set": {
                        f"{field}.{name}": value
                        for name, value in fields.items()
                        if name not in {"sends_in_window", "window_started_at"}
                    },
                    "$inc": {f"{field}.sends_in_window": 1},
                }
            ),
        )
        if counted.modified_count:
            return True
        # The window has run out (or there was none): this send opens a new one.
        opened = await self._users.update_one(
            {**pending, "$or": [{f"{field}.window_started_at": {"$lte": window_cutoff}}, {field: None}]},
            noticed({"$set": {field: fields}}),
        )
        return opened.modified_count == 1

    @storage_call
    async def find_account_by_reset_digest(self, user_id: str, digest: str, now: datetime) -> Account | None:
        # By _id: the token names its user, so the lookup goes to one shard and one index entry.
        document = await self._users.find_one(
            {
                "_id": _object_id(user_id),
                "password_reset.digest": digest,
                "password_reset.expires_at": {"$gt": now},
                "is_active": True,
            }
        )
        return None if document is None else _account_from_document(document)

    @storage_call
    async def reset_password(
        self,
        user_id: str,
        digest: str,
        password_hash: str,
        now: datetime,
        notice: Mail,
        *,
        history: PasswordHistory | None = None,
    ) -> bool:
        """Set the password if this reset token is still pending and unexpired; it works once.

        ``notice`` is pended in the same update: the reset and its notice happen together or not at all.
        """
        result = await self._users.update_one(
            {
                "_id": _object_id(user_id),
                "password_reset.digest": digest,
                "password_reset.expires_at": {"$gt": now},
                **_LIVE,
                **_replacing(history),
            },
            _with_notice(_new_password(password_hash, now, history), notice, now),
        )
        return result.modified_count == 1

    @storage_call
    async def set_password(
        self,
        user_id: str,
        password_hash: str,
        now: datetime,
        notice: Mail,
        *,
        history: PasswordHistory | None = None,
        change_required: bool = False,
    ) -> bool:
        """Set a new password, with its notice; a pending reset token dies with the old password."""
        update = _new_password(password_hash, now, history)
        if change_required:
            update["$set"]["password_change_required"] = True
            del update["$unset"]["password_change_required"]
        result = await self._users.update_one(
            # Never on a user being deleted: its notices have been moved to the outbox already.
            {"_id": _object_id(user_id), **_LIVE, **_replacing(history)},
            _with_notice(update, notice, now),
        )
        return result.modified_count == 1

    @storage_call
    async def upgrade_password_hash(self, user_id: str, old_hash: str, new_hash: str) -> bool:
        # The same password under our scheme: no token needs to die, and the profile did not change.
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "password_hash": old_hash, "password_scheme": PasswordScheme.BCRYPT.value},
            {"$set": {"password_hash": new_hash}, "$unset": {"password_scheme": ""}},
        )
        return result.modified_count == 1

    @storage_call
    async def pend_email_change(
        self,
        user_id: str,
        change: PendingEmailChange,
        *,
        max_sends: int,
        window_seconds: int,
        notice: Mail | None = None,
    ) -> bool:
        return await self._replace_code(
            "email_change",
            {"is_active": True, **_LIVE},
            user_id,
            change.code,
            max_sends,
            window_seconds,
            extra={"new_email": change.new_email},
            notice=notice,
        )

    @storage_call
    async def reserve_email_change_attempt(self, user_id: str, now: datetime) -> PendingEmailChange | None:
        pending = await self._reserve_code_attempt("email_change", {"is_active": True}, user_id, now)
        if pending is None:
            return None
        return PendingEmailChange(new_email=pending["new_email"], code=_activation_from_document(pending))

    async def _reserve_code_attempt(
        self, field: str, precondition: Document, user_id: str, now: datetime
    ) -> Document | None:
        """Count one attempt at the code pending in ``field``, unless it expired or has no attempt
        left; the pending sub-document as counted, or None.

        Counted before the code is compared, so parallel guesses cannot exceed its attempts.
        """
        document = await self._users.find_one_and_update(
            {
                "_id": _object_id(user_id),
                **precondition,
                f"{field}.expires_at": {"$gt": now},
                f"{field}.attempts_left": {"$gt": 0},
            },
            {"$inc": {f"{field}.attempts_left": -1}},
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else dict(document[field])

    @storage_call
    async def confirm_email_change(
        self, user_id: str, new_email: str, code_digest: str, now: datetime, notice: Mail | None = None
    ) -> tuple[User, User] | None:
        return await self._swap_email(
            {
                "_id": _object_id(user_id),
                "is_active": True,
                "email_change.new_email": new_email,
                "email_change.digest": code_digest,
                "email_change.expires_at": {"$gt": now},
            },
            new_email,
            now,
            notice,
        )

    @storage_call
    async def set_email(
        self, user_id: str, email: str, now: datetime, notice: Mail | None = None
    ) -> tuple[User, User] | None:
        return await self._swap_email({"_id": _object_id(user_id)}, email, now, notice)

    async def _swap_email(
        self, precondition: Document, email: str, now: datetime, notice: Mail | None
    ) -> tuple[User, User] | None:
        """Claim ``email``, then set it where ``precondition`` holds: a taken address writes
        nothing and raises :class:`AlreadyExists`. The old address is released afterwards.

        The pending change goes, and so does a pending password reset: its token was mailed to
        the old address, which no longer speaks for the account. ``notice`` (to the old address)
        is pended in the same update, which then applies only while ``notice.to`` is still the
        user's address: so the notice never goes to an address that was not the one replaced.
        """
        key = identifier_key(email)
        update: Document = {
            "$set": {"email": email, "email_key": key, "updated_at": now},
            "$unset": {"email_change": "", "password_reset": ""},
        }
        query = {**precondition, **_LIVE}
        if notice is not None:
            update = _with_notice(update, notice, now)
            query["email"] = notice.to
        before = await self._claimed_update(
            "email", key, query, _with_change(update, ChangeType.EMAIL_CHANGED, now), now
        )
        if before is None:
            return None
        await self._publish(before["_id"])
        old = _user_from_document(before)
        # As stored and read back later: BSON dates hold milliseconds.
        return old, dataclasses.replace(old, email=email, updated_at=to_milliseconds(now))


def _new_password(password_hash: str, now: datetime, history: PasswordHistory | None = None) -> Document:
    """The update that sets a new password: every token so far ends (the version), a hash of our
    scheme replaces an imported one, and a reset token or an email change pending from before
    dies with the old password. The password's age starts again, a change an admin required is
    done, and the history (when given) becomes the trimmed list, set whole: FerretDB ignores
    $push's $slice, which would leave every old hash in place."""
    update: Document = {
        "$set": {"password_hash": password_hash, "updated_at": now, "password_changed_at": now},
        "$unset": {"password_reset": "", "password_scheme": "", "email_change": "", "password_change_required": ""},
        "$inc": {"token_version": 1},
    }
    if history is not None:
        if history.hashes:
            update["$set"]["password_history"] = list(history.hashes)
        else:
            update["$unset"]["password_history"] = ""
    return update


def _replacing(history: PasswordHistory | None) -> Document:
    """The condition that the password is still the one the history was checked against."""
    return {} if history is None else {"password_hash": history.replaces}
