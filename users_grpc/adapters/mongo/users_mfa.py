"""The second factor in the ``users`` collection (part of
:class:`users_grpc.adapters.mongo.users.MongoUserRepository`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from bson import ObjectId
from pymongo import ASCENDING

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.adapters.mongo.users_base import UsersCollection
from users_grpc.adapters.mongo.users_bson import _LIVE, _with_change, _with_notice
from users_grpc.domain.model import ChangeType, Mail


class MfaUpdates(UsersCollection):
    """Enrolling, using and removing the second factor."""

    @storage_call
    async def sealed_totp_secrets(self, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        """One page, by ``_id`` (its index serves it), of (user id, sealed TOTP secret) after ``after``."""
        query: Document = {} if after is None else {"_id": {"$gt": ObjectId(after)}}
        cursor = self._users.find(query, {"mfa.sealed_secret": 1}).sort("_id", ASCENDING).limit(limit)
        page = []
        async for document in cursor:
            sealed = (document.get("mfa") or {}).get("sealed_secret")
            page.append((str(document["_id"]), b"" if sealed is None else bytes(sealed)))
        return page

    @storage_call
    async def reseal_totp_secret(self, user_id: str, sealed: bytes, resealed: bytes) -> bool:
        """Replace the sealed TOTP secret, unless it changed since it was read as ``sealed``."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.sealed_secret": sealed}, {"$set": {"mfa.sealed_secret": resealed}}
        )
        return result.modified_count == 1

    @storage_call
    async def start_mfa_enrollment(self, user_id: str, sealed_secret: bytes, now: datetime) -> bool:
        """Pend a new TOTP secret unless MFA is already on."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": {"$ne": "active"}},
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

    @storage_call
    async def confirm_mfa(
        self, user_id: str, step: int, recovery_digests: list[str], now: datetime, notice: Mail
    ) -> bool:
        """Turn a pending enrollment on, with its notice, if ``step`` is newer than the last used."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "pending", "mfa.last_used_step": {"$lt": step}, **_LIVE},
            _with_change(
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
                ChangeType.UPDATED,
                now,
            ),
        )
        return await self._published_if(result.modified_count == 1, user_id)

    @storage_call
    async def use_totp_step(self, user_id: str, step: int) -> bool:
        """Record ``step`` as used if it is newer than the last one: each code works once."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active", "mfa.last_used_step": {"$lt": step}},
            {"$set": {"mfa.last_used_step": step, "mfa.failures": 0}},
        )
        return result.modified_count == 1

    @storage_call
    async def use_recovery_code(self, user_id: str, digest: str) -> bool:
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active", "mfa.recovery_digests": digest},
            {"$pull": {"mfa.recovery_digests": digest}, "$set": {"mfa.failures": 0}},
        )
        return result.modified_count == 1

    @storage_call
    async def replace_recovery_codes(self, user_id: str, digests: list[str]) -> bool:
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active"}, {"$set": {"mfa.recovery_digests": digests}}
        )
        return result.modified_count == 1

    @storage_call
    async def disable_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        """Turn MFA off, with its notice; False if it was not on."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active", **_LIVE},
            _mfa_removed(notice, now),
        )
        return await self._published_if(result.modified_count == 1, user_id)

    @storage_call
    async def reset_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        """Remove any enrollment, active or pending, with its notice (an admin's reset); False if none."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa": {"$ne": None}, **_LIVE},
            _mfa_removed(notice, now),
        )
        return await self._published_if(result.modified_count == 1, user_id)

    @storage_call
    async def reserve_mfa_attempt(self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int) -> bool:
        """Count one second-factor attempt; False once ``max_attempts`` fell in the window."""
        # Only within an enrollment: a counter alone must not make an "mfa" sub-document.
        return await self._reserve_attempt("mfa", user_id, now, max_attempts, window_seconds, {"mfa": {"$ne": None}})

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
                "_id": _object_id(user_id),
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
                "_id": _object_id(user_id),
                **(precondition or {}),
                "$or": [{f"{field}.failure_window_start": {"$lte": cutoff}}, {f"{field}.failure_window_start": None}],
            },
            {"$set": {f"{field}.failures": 1, f"{field}.failure_window_start": now}},
        )
        return opened.modified_count == 1

    async def _published_if(self, changed: bool, user_id: str) -> bool:
        if changed:
            await self._publish(user_id)
        return changed


def _mfa_removed(notice: Mail, now: datetime) -> Document:
    """Remove the user's authenticator and recovery codes: their tokens die, they are told, and
    the change feed shows mfa_enabled off (DisableMfa and an admin's ResetUserMfa alike)."""
    update = {"$unset": {"mfa": ""}, "$set": {"updated_at": now}, "$inc": {"token_version": 1}}
    return _with_change(_with_notice(update, notice, now), ChangeType.UPDATED, now)
