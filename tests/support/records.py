"""What the repository test modules share: a fixed time, a new user with its activation code, and
the notices waiting in users' documents."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId

from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.domain.model import ActivationCode, Gender, Mail, NewUser, Role

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def activation(**changes: Any) -> ActivationCode:
    fields: dict[str, Any] = {
        "digest": "d1",
        "expires_at": NOW + timedelta(minutes=15),
        "attempts_left": 2,
        "sends_in_window": 1,
        "window_started_at": NOW,
    }
    fields.update(changes)
    return ActivationCode(**fields)


def new_user(username: str = "jane", email: str = "jane@example.com") -> NewUser:
    return NewUser(
        id=str(ObjectId()),
        username=username,
        first_name="Jane",
        last_name="Doe",
        email=email,
        gender=Gender.FEMALE,
        role=Role.USER,
        password_hash="$2b$10$hash",
        is_active=False,
        activation=activation(),
        created_at=NOW,
    )


async def notices_waiting(users: MongoUserRepository, at: datetime) -> list[Mail]:
    """The notices a sender would take at ``at``, left where they were."""
    claimed = await users.claim_pending_notices(at, 60)
    if claimed is None:
        return []
    await users.release_notices(claimed)
    return [notice.mail for notice in claimed.notices]
