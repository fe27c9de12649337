"""Passkeys inside their users' documents (part of :class:`users_grpc.adapters.mongo.users.MongoUserRepository`).

Embedded, not a collection of their own: a user has at most MAX_PASSKEYS, and embedding makes the
passkey, its notice and its change-feed entry one single-document update (the aggregate's outbox,
see :mod:`users_grpc.adapters.mongo`), and a sign-in's count check one conditional update of the
same document. ``passkeys`` maps each passkey id to its credential (a map, not an array, so every
update names its path without the positional operator); ``passkey_keys`` lists the credential
ids' digests, whose claims (``claims``, kind ``passkey``) keep a credential on one account only and
find its user by ``_id``: both shard-ready. ``webauthn_user_handle`` is random, never the user id.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from bson import Binary

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.claims import Claim
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.adapters.mongo.users_base import UsersCollection
from users_grpc.adapters.mongo.users_bson import _LIVE, _user_from_document, _with_change, _with_notice
from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import ChangeType, Mail, PasswordScheme
from users_grpc.domain.passkeys import MAX_PASSKEYS, PasskeyHolder, Removal, StoredPasskey

_KIND = "passkey"
_HAS_ROOM: Document = {"$or": [{"passkey_count": {"$lt": MAX_PASSKEYS}}, {"passkey_count": None}]}
# Another way in stays after a removal: a usable password, or another passkey.
_ANOTHER_WAY_IN: Document = {
    "$or": [{"password_scheme": {"$ne": PasswordScheme.NONE.value}}, {"passkey_count": {"$gt": 1}}]
}


def credential_key(credential_id: bytes) -> str:
    """A credential id's claim key: fixed length, whatever the authenticator's id (up to 1023 bytes)."""
    return hashlib.sha256(credential_id).hexdigest()


class PasskeyUpdates(UsersCollection):
    @storage_call
    async def passkey_holder(self, user_id: str) -> PasskeyHolder | None:
        document = await self._users.find_one({"_id": _object_id(user_id), **_LIVE})
        return None if document is None else _holder(document)

    @storage_call
    async def find_passkey_holder(self, identifier_key: str) -> PasskeyHolder | None:
        document = await self._find_by_identifier(identifier_key)
        return None if document is None else _holder(document)

    @storage_call
    async def holder_of_credential(self, credential_id: bytes) -> PasskeyHolder | None:
        user_id = await self._claims.holder(_KIND, credential_key(credential_id))
        if user_id is None:
            return None
        document = await self._users.find_one({"_id": user_id, **_LIVE})
        return None if document is None else _holder(document)

    @storage_call
    async def ensure_user_handle(self, user_id: str, candidate: bytes) -> bytes | None:
        query = {"_id": _object_id(user_id), **_LIVE}
        await self._users.update_one(
            {**query, "webauthn_user_handle": None}, {"$set": {"webauthn_user_handle": Binary(candidate)}}
        )
        document = await self._users.find_one(query, projection={"webauthn_user_handle": 1})
        return None if document is None else bytes(document["webauthn_user_handle"])

    @storage_call
    async def add_passkey(self, user_id: str, passkey: StoredPasskey, now: datetime, notice: Mail) -> bool:
        key = credential_key(passkey.credential_id)
        update = _with_change(
            _with_notice(
                {
                    "$set": {f"passkeys.{passkey.id}": _passkey_document(passkey), "updated_at": now},
                    "$inc": {"passkey_count": 1},
                    "$addToSet": {"passkey_keys": key},
                },
                notice,
                now,
            ),
            ChangeType.PASSKEY_ADDED,
            now,
        )
        query = {"_id": _object_id(user_id), **_LIVE, **_HAS_ROOM}
        claimed = await self._claims.claim(_KIND, key, query["_id"], now)
        if claimed is not Claim.NEW:  # another user's, or this user's already
            raise AlreadyExists("credential_id")
        result = await self._users.update_one({**query, "passkey_keys": {"$ne": key}}, update)
        if result.modified_count != 1:
            await self._claims.release(_KIND, key, query["_id"])
            return False
        await self._claims.settle(_KIND, key, query["_id"])
        await self._publish(query["_id"])
        return True

    @storage_call
    async def record_passkey_use(
        self, user_id: str, passkey_id: str, *, seen_count: int, new_count: int, backed_up: bool, now: datetime
    ) -> bool:
        path = f"passkeys.{passkey_id}"
        result = await self._users.update_one(
            {"_id": _object_id(user_id), **_LIVE, f"{path}.sign_count": seen_count},
            _with_change(
                {
                    "$set": {
                        f"{path}.sign_count": new_count,
                        f"{path}.last_used_at": now,
                        f"{path}.backed_up": backed_up,
                    }
                },
                ChangeType.PASSKEY_USED,
                now,
            ),
        )
        if result.modified_count != 1:
            return False
        await self._publish(user_id)
        return True

    @storage_call
    async def pend_notice(self, user_id: str, notice: Mail, now: datetime) -> None:
        await self._users.update_one({"_id": _object_id(user_id), **_LIVE}, _with_notice({}, notice, now))

    @storage_call
    async def rename_passkey(self, user_id: str, passkey_id: str, display_name: str, now: datetime) -> bool:
        path = f"passkeys.{passkey_id}"
        result = await self._users.update_one(
            {"_id": _object_id(user_id), **_LIVE, path: {"$exists": True}},
            {"$set": {f"{path}.display_name": display_name}},
        )
        return result.matched_count == 1

    @storage_call
    async def remove_passkey(self, user_id: str, passkey_id: str, now: datetime, notice: Mail) -> Removal:
        path = f"passkeys.{passkey_id}"
        user = _object_id(user_id)
        document = await self._users.find_one({"_id": user, **_LIVE, path: {"$exists": True}})
        if document is None:
            return Removal.NOT_FOUND
        key = credential_key(bytes(document["passkeys"][passkey_id]["credential_id"]))
        update = _with_change(
            _with_notice(
                {
                    "$unset": {path: ""},
                    "$set": {"updated_at": now},
                    "$inc": {"passkey_count": -1},
                    "$pullAll": {"passkey_keys": [key]},
                },
                notice,
                now,
            ),
            ChangeType.PASSKEY_REMOVED,
            now,
        )
        result = await self._users.update_one(
            {"_id": user, **_LIVE, path: {"$exists": True}, **_ANOTHER_WAY_IN}, update
        )
        if result.modified_count != 1:
            again = await self._users.find_one({"_id": user, **_LIVE, path: {"$exists": True}}, projection={"_id": 1})
            return Removal.NOT_FOUND if again is None else Removal.LAST_SIGN_IN_METHOD
        await self._claims.release(_KIND, key, user)
        await self._publish(user)
        return Removal.REMOVED


def _passkey_document(passkey: StoredPasskey) -> Document:
    return {
        "credential_id": Binary(passkey.credential_id),
        "public_key": Binary(passkey.public_key),
        "sign_count": passkey.sign_count,
        "display_name": passkey.display_name,
        "created_at": passkey.created_at,
        "last_used_at": passkey.last_used_at,
        "aaguid": passkey.aaguid,
        "backup_eligible": passkey.backup_eligible,
        "backed_up": passkey.backed_up,
        "transports": list(passkey.transports),
    }


def _passkey_from_document(passkey_id: str, document: Document) -> StoredPasskey:
    return StoredPasskey(
        id=passkey_id,
        credential_id=bytes(document["credential_id"]),
        public_key=bytes(document["public_key"]),
        sign_count=document["sign_count"],
        display_name=document["display_name"],
        created_at=document["created_at"],
        last_used_at=document.get("last_used_at"),
        aaguid=document["aaguid"],
        backup_eligible=document["backup_eligible"],
        backed_up=document["backed_up"],
        transports=tuple(document.get("transports") or ()),
    )


def _holder(document: Document) -> PasskeyHolder:
    passkeys: dict[str, Any] = document.get("passkeys") or {}
    mfa = document.get("mfa") or {}
    handle = document.get("webauthn_user_handle")
    stored = [_passkey_from_document(pid, p) for pid, p in passkeys.items()]
    return PasskeyHolder(
        user=_user_from_document(document),
        user_handle=None if handle is None else bytes(handle),
        password_set=document.get("password_scheme") != PasswordScheme.NONE.value,
        totp_enabled=mfa.get("state") == "active",
        recovery_codes_remaining=len(mfa.get("recovery_digests") or ()) if mfa.get("state") == "active" else 0,
        passkeys=tuple(sorted(stored, key=lambda p: (p.created_at, p.id))),
    )
