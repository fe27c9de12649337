"""ListUsers against the real database: every filter (role, state, MFA, a prefix of the username
or the email, never a pattern, the creation range), never a user being deleted, and keyset pages
by id."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from bson import ObjectId

from tests.support.records import NOW, new_user
from tests.support.stores import Stores
from users_grpc.domain.model import Mail, Role, User, UserFilter, UserState

NOTICE = Mail(to="jane@example.com", subject="s", body="b")


async def some_users(stores: Stores) -> dict[str, User]:
    """One user in each state, an admin, one with MFA on, created a day apart, and one being deleted."""
    users = stores.users
    made: dict[str, User] = {}
    for n, name in enumerate(("pending", "admin", "mfa", "locked", "gone", "deactivated", "deleting")):
        fields = new_user(name, "second.factor@example.com" if name == "mfa" else f"{name}@example.com")
        role = Role.ADMIN if name == "admin" else Role.USER
        made[name] = await users.add(dataclasses.replace(fields, created_at=NOW + timedelta(days=n), role=role))
        if name != "pending":
            assert await users.activate(made[name].id, "d1", NOW) is not None
    assert await users.start_mfa_enrollment(made["mfa"].id, b"s", NOW)
    assert await users.confirm_mfa(made["mfa"].id, 1, [], NOW, NOTICE)
    for name, state in (("locked", UserState.LOCKED), ("deactivated", UserState.DEACTIVATED)):
        assert await users.change_state(made[name].id, from_states=frozenset({UserState.ACTIVE}), to=state, now=NOW)
    assert await users.delete(made.pop("gone").id)
    await stores.database["users"].update_one({"_id": ObjectId(made.pop("deleting").id)}, {"$set": {"deleting": NOW}})
    return made


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (UserFilter(), ["pending", "admin", "mfa", "locked", "deactivated"]),
        (UserFilter(role=Role.ADMIN), ["admin"]),
        (UserFilter(role=Role.USER), ["pending", "mfa", "locked", "deactivated"]),
        (UserFilter(state=UserState.ACTIVE), ["admin", "mfa"]),
        (UserFilter(state=UserState.PENDING_ACTIVATION), ["pending"]),
        (UserFilter(state=UserState.LOCKED), ["locked"]),
        (UserFilter(state=UserState.DEACTIVATED), ["deactivated"]),
        (UserFilter(mfa_enabled=True), ["mfa"]),
        (UserFilter(mfa_enabled=False), ["pending", "admin", "locked", "deactivated"]),
        (UserFilter(prefix_key="lo"), ["locked"]),
        (UserFilter(prefix_key="mf"), ["mfa"]),  # by username
        (UserFilter(prefix_key="second.f"), ["mfa"]),  # by email
        (UserFilter(prefix_key="ocked"), []),  # a prefix, not a substring
        (UserFilter(prefix_key="."), []),  # the caller's text, never a pattern
        (UserFilter(created_after=NOW + timedelta(days=2)), ["mfa", "locked", "deactivated"]),
        (UserFilter(created_before=NOW + timedelta(days=2)), ["pending", "admin"]),
        (UserFilter(role=Role.USER, state=UserState.ACTIVE), ["mfa"]),
    ],
)
async def test_listed_users_match_every_filter_and_never_include_deleted_ones(
    stores: Stores, filters: UserFilter, expected: list[str]
) -> None:
    made = await some_users(stores)
    listed = await stores.users.list_users(filters, None, 100)
    assert [user.username for user in listed] == expected
    assert [user.id for user in listed] == [made[name].id for name in expected]
    assert listed == [await stores.users.get(made[name].id) for name in expected]
    assert await stores.users.count_users(filters) == len(expected)


async def test_list_pages_follow_the_id_after_the_last_one(stores: Stores) -> None:
    await some_users(stores)
    first = await stores.users.list_users(UserFilter(), None, 2)
    second = await stores.users.list_users(UserFilter(), first[-1].id, 2)
    third = await stores.users.list_users(UserFilter(), second[-1].id, 2)
    assert [u.username for u in first + second + third] == ["pending", "admin", "mfa", "locked", "deactivated"]
