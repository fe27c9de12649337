"""The audit trail's storage against the real database (FerretDB, or USERS_TEST_MONGODB_URI): every
list filter and the purge lead an index, and keyset pages order events of one millisecond by id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from tests.support.stores import Stores
from users_grpc.domain import ActorKind, AuditActor, AuditEvent, AuditEventType, AuditFilter, AuditPosition
from users_grpc.repository import MongoHousekeeping, audit_events_query

_T = TypeVar("_T")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
SUBJECT = "a" * 24


def event(moment: datetime, type_: AuditEventType = AuditEventType.USER_LOCK) -> AuditEvent:
    actor = AuditActor(kind=ActorKind.USER, id="b" * 24, source="127.0.0.1")
    return AuditEvent(type=type_, time=moment, actor=actor, subject_id=SUBJECT, status_code=0)


# What each filter (and the purge) asks of the collection, and the field its index must lead with.
QUERIES = [
    ({"subject_id": SUBJECT}, "subject_id"),
    ({"actor.id": "b" * 24}, "actor.id"),
    ({"type": {"$in": ["user_lock"]}}, "type"),
    ({"time": {"$gte": NOW, "$lt": NOW + timedelta(days=1)}}, "time"),
    (audit_events_query(NOW), "time"),
]


@pytest.mark.parametrize(("query", "leading"), QUERIES)
async def test_every_filter_and_the_purge_lead_an_index(stores: Stores, query: dict[str, Any], leading: str) -> None:
    database = stores.database
    indexes = [index["key"] async for index in await database["audit_events"].list_indexes()]
    assert any(next(iter(key)) == leading for key in indexes), indexes
    explained = await database.command(
        "explain", {"find": "audit_events", "filter": query, "sort": {"time": -1, "_id": -1}}
    )
    if "ferretdbVersion" in explained.get("serverInfo", {}):
        return  # FerretDB's SQLite backend scans whatever the indexes
    plan = str(explained["queryPlanner"]["winningPlan"])
    assert "IXSCAN" in plan, plan
    assert "COLLSCAN" not in plan, plan


async def test_pages_walk_one_millisecond_by_id_and_the_purge_keeps_newer_events(stores: Stores) -> None:
    database, trail = stores.database, stores.audit
    for _ in range(5):
        await trail.add(event(NOW))
    await trail.add(event(NOW + timedelta(milliseconds=1), AuditEventType.USER_UNLOCK))
    everything = await trail.list_events(AuditFilter(), None, 100)
    assert len(everything) == 6
    assert everything[0].type is AuditEventType.USER_UNLOCK
    assert [e.id for e in everything[1:]] == sorted((e.id for e in everything[1:]), reverse=True)
    pages: list[str] = []
    before: AuditPosition | None = None
    while page := await trail.list_events(AuditFilter(), before, 2):
        pages += [e.id for e in page]
        before = AuditPosition(page[-1].time, page[-1].id)
    assert pages == [e.id for e in everything]
    only = await trail.list_events(AuditFilter(types=frozenset({AuditEventType.USER_UNLOCK})), None, 100)
    assert [e.id for e in only] == [everything[0].id]
    assert await MongoHousekeeping(database).purge_audit_events(NOW + timedelta(milliseconds=1)) == 5
    assert [e.id for e in await trail.list_events(AuditFilter(), None, 100)] == [everything[0].id]
