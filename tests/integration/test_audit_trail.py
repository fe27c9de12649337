"""The audit trail's storage against the real database (FerretDB, or USERS_TEST_MONGODB_URI): every
list filter and the purge lead an index, keyset pages order events of one millisecond by id, and
each filter finds its events, read back whole."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from bson import ObjectId

from tests.support.stores import Stores
from users_grpc.adapters.mongo.housekeeping import MongoHousekeeping, audit_events_query
from users_grpc.domain.model import ActorKind, AuditActor, AuditEvent, AuditEventType, AuditFilter, AuditPosition

_T = TypeVar("_T")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
SUBJECT = "a" * 24


def event(moment: datetime, type_: AuditEventType = AuditEventType.USER_LOCK) -> AuditEvent:
    actor = AuditActor(kind=ActorKind.USER, id="b" * 24, source="127.0.0.1")
    return AuditEvent(type=type_, time=moment, actor=actor, subject_id=SUBJECT, status_code=0)


def audit_event(n: int, type_: AuditEventType, subject: str, actor: str) -> AuditEvent:
    return AuditEvent(
        type=type_,
        time=NOW + timedelta(minutes=n),
        actor=AuditActor(kind=ActorKind.USER, id=actor, source=f"10.0.0.{n}"),
        subject_id=subject,
        status_code=n,
        error_reason=f"reason{n}",
        reason=f"note{n}",
    )


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


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (AuditFilter(), [3, 2, 1, 0]),
        (AuditFilter(subject_id="s1"), [1, 0]),
        (AuditFilter(actor_id="a1"), [2, 0]),
        (AuditFilter(types=frozenset({AuditEventType.USER_UNLOCK, AuditEventType.USER_DELETE})), [3, 1]),
        (AuditFilter(start_time=NOW + timedelta(minutes=1)), [3, 2, 1]),
        (AuditFilter(end_time=NOW + timedelta(minutes=1)), [0]),
        (AuditFilter(subject_id="s1", actor_id="a1"), [0]),
    ],
)
async def test_audit_events_match_every_filter_and_read_back_whole(
    stores: Stores, filters: AuditFilter, expected: list[int]
) -> None:
    events = [
        audit_event(0, AuditEventType.USER_LOCK, "s1", "a1"),
        audit_event(1, AuditEventType.USER_UNLOCK, "s1", "a2"),
        audit_event(2, AuditEventType.USER_LOCK, "s2", "a1"),
        audit_event(3, AuditEventType.USER_DELETE, "s2", "a2"),
    ]
    for event in events:
        await stores.audit.add(event)
    listed = await stores.audit.list_events(filters, None, 10)
    assert [dataclasses.replace(event, id="") for event in listed] == [events[n] for n in expected]
    assert all(ObjectId.is_valid(event.id) for event in listed)
