"""The ``audit_events`` collection."""

from __future__ import annotations

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.documents import Document, _object_id
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.domain.model import ActorKind, AuditActor, AuditEvent, AuditEventType, AuditFilter, AuditPosition


class MongoAuditTrail:
    """The ``audit_events`` collection: appended to, never updated; purged by housekeeping.

    Indexes (made by :meth:`ensure_indexes`), each ending in the page order (time, _id), newest first:

    - ``time_id``: the unfiltered list, a time range, and housekeeping's purge by age;
    - ``subject_time_id``, ``actor_time_id``, ``type_time_id``: the subject, actor and type filters.
    """

    def __init__(self, database: AsyncDatabase[Document], users: MongoUserRepository) -> None:
        self._events: AsyncCollection[Document] = database["audit_events"]
        self._users = users

    @storage_call
    async def ensure_indexes(self) -> None:
        order = [("time", DESCENDING), ("_id", DESCENDING)]
        await self._events.create_index(order, name="time_id")
        await self._events.create_index([("subject_id", ASCENDING), *order], name="subject_time_id")
        await self._events.create_index([("actor.id", ASCENDING), *order], name="actor_time_id")
        await self._events.create_index([("type", ASCENDING), *order], name="type_time_id")

    @storage_call
    async def add(self, event: AuditEvent) -> None:
        await self._events.insert_one(
            {
                "time": event.time,
                "type": event.type.value,
                "actor": {"kind": event.actor.kind.value, "id": event.actor.id, "source": event.actor.source},
                "subject_id": event.subject_id,
                "status_code": event.status_code,
                "error_reason": event.error_reason,
                "reason": event.reason,
            }
        )

    @storage_call
    async def list_events(self, filters: AuditFilter, before: AuditPosition | None, limit: int) -> list[AuditEvent]:
        clauses = _audit_query(filters)
        if before is not None:
            # The keyset: older than the last event of the page before, by time and then id, so a
            # page deep in the trail costs what the first one does and new events never shift it.
            at = _object_id(before.id)
            clauses.append({"$or": [{"time": {"$lt": before.time}}, {"time": before.time, "_id": {"$lt": at}}]})
        query = {"$and": clauses} if clauses else {}
        cursor = self._events.find(query).sort([("time", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [_audit_event_from_document(document) async for document in cursor]

    @storage_call
    async def find_user_id(self, identifier_key: str) -> str | None:
        account = await self._users.find_account(identifier_key)
        return None if account is None else account.user.id


def _audit_query(filters: AuditFilter) -> list[Document]:
    clauses: list[Document] = []
    if filters.subject_id:
        clauses.append({"subject_id": filters.subject_id})
    if filters.actor_id:
        clauses.append({"actor.id": filters.actor_id})
    if filters.types:
        clauses.append({"type": {"$in": sorted(t.value for t in filters.types)}})
    time: Document = {}
    if filters.start_time is not None:
        time["$gte"] = filters.start_time
    if filters.end_time is not None:
        time["$lt"] = filters.end_time
    if time:
        clauses.append({"time": time})
    return clauses


def _audit_event_from_document(document: Document) -> AuditEvent:
    actor = document["actor"]
    return AuditEvent(
        id=str(document["_id"]),
        type=AuditEventType(document["type"]),
        time=document["time"],
        actor=AuditActor(kind=ActorKind(actor["kind"]), id=actor["id"], source=actor["source"]),
        subject_id=document["subject_id"],
        status_code=int(document["status_code"]),
        error_reason=document["error_reason"],
        reason=document["reason"],
    )
