"""Leases for one-replica jobs, and housekeeping's purges with the queries they send."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pymongo import DESCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.claims import MongoClaims
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.mongo.passkey_ceremonies import MongoCeremonyStore
from users_grpc.adapters.mongo.users_bson import _LIVE, _with_change
from users_grpc.domain.model import ChangeType

_SWEEP_LIMIT = 100


class MongoHousekeeping:
    """Leases for jobs that one replica at a time runs (the ``leases`` collection, by ``_id``), and
    the purges of housekeeping, each served by an index."""

    def __init__(self, database: AsyncDatabase[Document], outbox: MongoOutbox | None = None) -> None:
        self._leases: AsyncCollection[Document] = database["leases"]
        self._users: AsyncCollection[Document] = database["users"]
        self._sessions: AsyncCollection[Document] = database["sessions"]
        self._outbox: AsyncCollection[Document] = database["outbox"]
        self._throttles: AsyncCollection[Document] = database["throttles"]
        self._claims = MongoClaims(database)
        self._audit_events: AsyncCollection[Document] = database["audit_events"]
        self._changes: AsyncCollection[Document] = database["user_changes"]
        self._ceremonies = MongoCeremonyStore(database)
        self._change_log = MongoChangeLog(database, outbox)

    @storage_call
    async def take_lease(self, job: str, holder: str, now: datetime, lease_seconds: float) -> bool:
        try:
            document = await self._leases.find_one_and_update(
                # Free (its lease ran out) or already ours; if there is no lease document yet, the upsert makes it.
                {"_id": job, "$or": [{"leased_until": {"$lt": now}}, {"holder": holder}]},
                {"$set": {"leased_until": now + timedelta(seconds=lease_seconds), "holder": holder, "taken_at": now}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            # The document exists and another holder's lease is running: the upsert's insert clashed.
            return False
        return document is not None and document["holder"] == holder

    @storage_call
    async def purge_ended_sessions(self, ended_before: datetime) -> int:
        deleted = 0
        for query in ended_sessions_queries(ended_before):
            deleted += (await self._sessions.delete_many(query)).deleted_count
        return deleted

    @storage_call
    async def purge_never_activated_users(self, created_before: datetime) -> int:
        # Deleted as any user is (MongoUserRepository._delete_where): marked with the change, then finished.
        now = datetime.now(UTC)
        marked = await self._users.update_many(
            {**never_activated_query(created_before), **_LIVE},
            _with_change({"$set": {"deleting": now}}, ChangeType.DELETED, now),
        )
        # Finished at once, so the usernames and emails are free when the purge returns.
        for _ in range(marked.modified_count // _SWEEP_LIMIT + 1):
            if await self._change_log.sweep(now, _SWEEP_LIMIT) < _SWEEP_LIMIT:
                break
        return marked.modified_count

    @storage_call
    async def release_stale_claims(self, now: datetime) -> int:
        return await self._claims.release_stale(now)

    @storage_call
    async def purge_changes(self, published_before: datetime) -> int:
        """Delete the changes published before ``published_before``: always a prefix of the
        sequence (so the retained changes stay consecutive), and never the newest change (so
        the sequence never starts over)."""
        boundary = await self._changes.find_one(
            {"published_at": {"$lt": published_before}}, projection={"_id": 1}, sort=[("published_at", DESCENDING)]
        )
        if boundary is None:
            return 0
        last = min(int(boundary["_id"]), await self._change_log.last_sequence() - 1)
        return (await self._changes.delete_many({"_id": {"$lte": last}})).deleted_count

    @storage_call
    async def purge_failed_mail(self, failed_before: datetime) -> int:
        return (await self._outbox.delete_many(failed_mail_query(failed_before))).deleted_count

    @storage_call
    async def purge_expired_tallies(self, now: datetime) -> int:
        return (await self._throttles.delete_many(expired_tallies_query(now))).deleted_count

    async def purge_expired_ceremonies(self, now: datetime) -> int:
        """Passkey ceremonies started and never finished (a finish deletes its own)."""
        return await self._ceremonies.purge_expired(now)

    @storage_call
    async def purge_audit_events(self, recorded_before: datetime) -> int:
        # FerretDB has no TTL indexes, so age is purged here, on the time_id index.
        return (await self._audit_events.delete_many(audit_events_query(recorded_before))).deleted_count


# The purges' queries, each served by an index that ensure_indexes makes (tests check the plans).


def ended_sessions_queries(ended_before: datetime) -> list[Document]:
    """Sessions that expired, and sessions that were revoked, before ``ended_before``."""
    return [{"expires_at": {"$lt": ended_before}}, {"revoked_at": {"$lt": ended_before}}]


def never_activated_query(created_before: datetime) -> Document:
    # A pending activation marks an account never activated (activating removes it); an account
    # deactivated later has none, and is kept.
    # Imported users were accounts elsewhere: waiting does not make them abandoned.
    return {
        "is_active": False,
        "created_at": {"$lt": created_before},
        "activation": {"$type": "object"},
        "imported": {"$ne": True},
    }


def failed_mail_query(failed_before: datetime) -> Document:
    return {"status": "failed", "failed_at": {"$lt": failed_before}}


def expired_tallies_query(now: datetime) -> Document:
    # Throttle tallies past any use: failures past their window and longest delay, request
    # counts of a past window, sources not seen within their lifetime.
    return {"expires_at": {"$lt": now}}


def audit_events_query(recorded_before: datetime) -> Document:
    return {"time": {"$lt": recorded_before}}
