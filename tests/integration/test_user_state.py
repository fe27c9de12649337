"""Users' states in the repository, against the real database (FerretDB, or USERS_TEST_MONGODB_URI):
documents written before states existed, suspended accounts and housekeeping, the count of
active admins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from bson import ObjectId

from tests.support.stores import Stores
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.housekeeping import never_activated_query
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.domain.errors import LastActiveAdmin
from users_grpc.domain.model import ActivationCode, Gender, NewUser, Role, User, UserState
from users_grpc.domain.ports import UserRepository
from users_grpc.services.last_admin import keep_an_active_admin

_T = TypeVar("_T")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
LONG_AGO = NOW - timedelta(days=30)
SUSPENDED = (UserState.DEACTIVATED, UserState.LOCKED)


def activation() -> ActivationCode:
    return ActivationCode(
        digest="d", expires_at=NOW + timedelta(minutes=15), attempts_left=5, sends_in_window=1,
        window_started_at=NOW - timedelta(days=1),
    )  # fmt: skip


def new_user(username: str, *, active: bool, role: Role = Role.USER) -> NewUser:
    return NewUser(
        id=str(ObjectId()),
        username=username,
        first_name="A",
        last_name="B",
        email=f"{username}@example.com",
        gender=Gender.UNSPECIFIED,
        role=role,
        password_hash="$2b$10$hash",
        is_active=active,
        activation=None if active else activation(),
        created_at=LONG_AGO,
    )


def legacy_document(username: str, *, active: bool) -> Document:
    """A user as stored before states existed: no ``state`` field."""
    document: Document = {
        "_id": ObjectId(),
        "username": username,
        "username_key": username,
        "first_name": "A",
        "last_name": "B",
        "email": f"{username}@example.com",
        "email_key": f"{username}@example.com",
        "gender": "unspecified",
        "role": "user",
        "is_active": active,
        "password_hash": "$2b$10$hash",
        "activation": None,
        "created_at": LONG_AGO,
        "updated_at": LONG_AGO,
        "token_version": 0,
    }
    if not active:
        document["activation"] = {
            "digest": "d",
            "expires_at": NOW + timedelta(minutes=15),
            "attempts_left": 5,
            "sends_in_window": 1,
            "window_started_at": LONG_AGO,
        }
    return document


async def test_documents_without_a_state_read_back_with_the_state_they_are_in(stores: Stores) -> None:
    active, pending = legacy_document("old-active", active=True), legacy_document("old-pending", active=False)
    await stores.database.users.insert_many([active, pending])
    assert (await stores.users.get(str(active["_id"]))).state is UserState.ACTIVE  # type: ignore[union-attr]
    pending_user = await stores.users.get(str(pending["_id"]))
    assert pending_user is not None
    assert (pending_user.state, pending_user.is_active) == (UserState.PENDING_ACTIVATION, False)
    account = await stores.users.find_account("old-pending")
    assert account is not None
    assert account.user.state is UserState.PENDING_ACTIVATION
    # The filters of state changes find them by what they are.
    before = await stores.users.change_state(
        str(active["_id"]), from_states=frozenset({UserState.ACTIVE}), to=UserState.LOCKED, now=NOW
    )
    assert before is not None
    assert before.state is UserState.ACTIVE
    stored = await stores.database.users.find_one({"_id": active["_id"]})
    assert stored is not None
    assert (stored["state"], stored["is_active"]) == ("locked", False)
    assert not await stores.users.change_state(
        str(pending["_id"]), from_states=frozenset({UserState.ACTIVE}), to=UserState.LOCKED, now=NOW
    )
    # A legacy pending account still gets new codes; a suspended one never does.
    assert await stores.users.replace_activation_code(
        str(pending["_id"]), activation(), max_sends=5, window_seconds=3600
    )
    assert not await stores.users.replace_activation_code(
        str(active["_id"]), activation(), max_sends=5, window_seconds=3600
    )


async def test_housekeeping_never_purges_a_suspended_account(stores: Stores) -> None:
    users = stores.users
    kept = []
    for state in SUSPENDED:
        # From active, and (as the repository allows, though the service does not) from pending:
        # suspending drops a pending activation, which is what the purge keys on.
        for active in (True, False):
            user = await users.add(new_user(f"{state.value}-{active}", active=active))
            from_state = UserState.ACTIVE if active else UserState.PENDING_ACTIVATION
            assert await users.change_state(user.id, from_states=frozenset({from_state}), to=state, now=NOW)
            kept.append(user.id)
    never_activated = await users.add(new_user("idle", active=False))

    matching = await stores.database.users.find(never_activated_query(NOW)).to_list()
    assert [str(d["_id"]) for d in matching] == [never_activated.id]
    assert await stores.housekeeping.purge_never_activated_users(NOW) == 1
    for user_id in kept:
        still = await users.get(user_id)
        assert still is not None
        assert still.state in SUSPENDED


async def test_active_admins_are_counted_by_state_and_role(stores: Stores) -> None:
    users = stores.users
    admins = [await users.add(new_user(f"admin{n}", active=True, role=Role.ADMIN)) for n in range(3)]
    await users.add(new_user("pending-admin", active=False, role=Role.ADMIN))
    await users.add(new_user("user", active=True))
    await stores.database.users.insert_one({**legacy_document("legacy-admin", active=True), "role": "admin"})
    assert await users.count_active_admins() == 4
    await users.change_state(admins[0].id, from_states=frozenset({UserState.ACTIVE}), to=UserState.LOCKED, now=NOW)
    assert await users.set_role(admins[1].id, Role.USER, NOW) is not None
    assert await users.set_role(admins[1].id, Role.USER, NOW) is None  # the role is hers already
    assert await users.count_active_admins() == 2
    # Deleting refuses an active admin, and takes a suspended one.
    assert not await users.delete_unless_active_admin(admins[2].id)
    assert await users.delete_unless_active_admin(admins[0].id)
    assert await users.get(admins[2].id) is not None


async def test_the_count_of_active_admins_is_served_by_an_index(stores: Stores) -> None:
    """On MongoDB the plan is an index scan (FerretDB's explain does not say)."""

    explained = await stores.database.command(
        "explain", {"count": "users", "query": {"role": "admin", "is_active": True}}
    )
    if "ferretdbVersion" in explained.get("serverInfo", {}):
        return
    plan = str(explained["queryPlanner"]["winningPlan"])
    assert "IXSCAN" in plan or "COUNT_SCAN" in plan, plan
    assert "COLLSCAN" not in plan, plan


async def test_the_counts_of_active_admins_take_turns(stores: Stores) -> None:
    """One holder at a time, across replicas: a lease document taken by one upsert, released by
    its holder only, and free again once it runs out (its holder died)."""

    users = stores.users
    taken = await asyncio.gather(*(users.take_admin_check(f"count{n}", 60) for n in range(10)))
    assert sum(taken) == 1
    holder = f"count{taken.index(True)}"
    assert not await users.take_admin_check("other", 60)
    await users.release_admin_check("other")  # not the holder: changes nothing
    assert not await users.take_admin_check("other", 60)
    await users.release_admin_check(holder)
    assert await users.take_admin_check("other", -1)  # taken, but already run out (as a dead holder's)
    assert await users.take_admin_check(holder, 60)
    assert not await users.take_admin_check("other", 60)


class Arrivals:
    """The repository, telling when a second check of active admins arrives: it has counted, or
    is refused its turn while the first holds it."""

    def __init__(self, users: MongoUserRepository) -> None:
        self._users = users
        self._counts = 0
        self.second = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._users, name)

    async def count_active_admins(self) -> int:
        count = await self._users.count_active_admins()
        self._counts += 1
        if self._counts == 2:  # once the second has counted, not before: the first's undo must not overtake it
            self.second.set()
        return count

    async def take_admin_check(self, holder: str, lease_seconds: float) -> bool:
        taken = await self._users.take_admin_check(holder, lease_seconds)
        if not taken:
            self.second.set()
        return taken


async def test_removals_of_the_last_admins_undo_themselves_in_every_interleaving(stores: Stores) -> None:
    """Two admins demote each other. The e2e race cannot choose its interleaving; here each is forced."""

    users = stores.users
    ada = await users.add(new_user("ada", active=True, role=Role.ADMIN))
    bea = await users.add(new_user("bea", active=True, role=Role.ADMIN))

    def demote(user_id: str) -> Awaitable[User | None]:
        return users.set_role(user_id, Role.USER, NOW)

    async def stands(before: User | None, arrivals: Arrivals | None = None) -> bool:
        """keep_an_active_admin after a demotion; True if the demotion stands. With arrivals, an
        undo waits until a second check arrived."""
        assert before is not None

        async def undo() -> object:
            if arrivals is not None:
                await asyncio.wait_for(arrivals.second.wait(), timeout=30)
            return await users.set_role(before.id, Role.ADMIN, NOW)

        try:
            await keep_an_active_admin(cast(UserRepository, arrivals or users), before, undo=undo)
        except LastActiveAdmin:
            return False
        return True

    # Both writes land, then both check, the first undoing only once the second arrived (counts,
    # or waits for its turn). Counting at once, both saw none left and both undid (a false
    # LAST_ACTIVE_ADMIN); the counts take turns, so the second counts after the undo and stands.
    first, second = await demote(ada.id), await demote(bea.id)
    watched = Arrivals(users)
    outcomes = await asyncio.gather(stands(first, watched), stands(second, watched))
    assert sorted(outcomes) == [False, True]  # whichever took its turn first undid itself
    assert await users.count_active_admins() == 1
    await users.set_role(ada.id, Role.ADMIN, NOW)
    await users.set_role(bea.id, Role.ADMIN, NOW)
    # Both writes land, one counts and undoes before the other counts: the other stands.
    first, second = await demote(ada.id), await demote(bea.id)
    assert [await stands(first), await stands(second)] == [False, True]
    assert await users.count_active_admins() == 1
    # One counts before the other writes: it stands, and the later one undoes itself.
    await users.set_role(bea.id, Role.ADMIN, NOW)
    assert await stands(await demote(ada.id))
    assert not await stands(await demote(bea.id))
    remaining = await users.get(bea.id)
    assert remaining is not None
    assert remaining.is_active_admin
    assert await users.count_active_admins() == 1
