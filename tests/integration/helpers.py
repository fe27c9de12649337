"""What the repository test modules share: a fixed time, and a new user with its activation code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId

from users_grpc.domain import ActivationCode, Gender, NewUser, Role

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
