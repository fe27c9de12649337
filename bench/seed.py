"""Many users straight into the database, for the benchmarks: through the service, bcrypt alone
would take hours. Each is a copy of a user the service wrote, so every field is as it writes
them, with its own name, email and the claims that make both unique."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo.database import Database

from users_grpc.adapters.mongo.claims import claim_documents
from users_grpc.adapters.mongo.metadata_bson import _metadata_document
from users_grpc.domain.metadata import MetadataEntry, MetadataScope
from users_grpc.domain.model import ActorKind, AuditEventType, Role
from users_grpc.domain.rules import identifier_key

Document = dict[str, Any]


def seed_users(
    database: Database[Document],
    model: Mapping[str, Any],
    names: Sequence[str],
    batch: int = 1000,
    *,
    audit_events: bool = False,
    tenants: int = 0,
) -> None:
    """Insert a user for each of ``names``: a copy of ``model`` (a user document the service
    wrote, such as its first admin's) with the role user; with ``audit_events``, one audit event
    each (an admin's role change of that user, as the service records it), so the audit trail
    grows with the users; with ``tenants``, an admin-scope metadata entry ``tenant`` each, its value
    one of that many (``tenant-000``, ...), in turn, for ListUsers filtered by metadata."""
    template = {key: value for key, value in model.items() if key != "_id"} | {"role": Role.USER.value}
    now = datetime.now(UTC)
    for first in range(0, len(names), batch):
        users = [_copy(template, name) for name in names[first : first + batch]]
        if tenants:
            for number, user in enumerate(users, start=first):
                user["metadata"] = _metadata_document((_tenant(f"tenant-{number % tenants:03d}", now),))
        database["users"].insert_many(users)
        database["claims"].insert_many([claim for user in users for claim in claim_documents(user, now)])
        if audit_events:
            database["audit_events"].insert_many([_event(model, user, now) for user in users])


def _event(admin: Mapping[str, Any], user: Document, now: datetime) -> Document:
    """The document the audit log stores (users_grpc.adapters.mongo.audit_trail's MongoAuditTrail.add)."""
    return {
        "time": now,
        "type": AuditEventType.ROLE_CHANGE.value,
        "actor": {"kind": ActorKind.USER.value, "id": str(admin["_id"]), "source": "127.0.0.1"},
        "subject_id": str(user["_id"]),
        "status_code": 0,
        "error_reason": "",
        "reason": "",
    }


def _tenant(value: str, now: datetime) -> MetadataEntry:
    return MetadataEntry(
        scope=MetadataScope.ADMIN, key="tenant", value=value.encode(), etag=str(ObjectId()), updated_at=now
    )


def _copy(template: Document, name: str) -> Document:
    email = f"{name}@example.com"
    return template | {
        "_id": ObjectId(),
        "username": name,
        "username_key": identifier_key(name),
        "email": email,
        "email_key": identifier_key(email),
    }
