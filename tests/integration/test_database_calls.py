"""Each repository call against a database that does not answer: an unreachable one is
StorageUnavailable, a call's budget bounds each operation and never outlasts its deadline, and a
cancelled call leaves its work to end within its budget, cancelled at shutdown."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from tests.support.records import new_user
from tests.support.sockets import collect_known_leaks
from tests.support.stores import paused
from users_grpc.adapters.mongo import calls
from users_grpc.adapters.mongo.calls import cancel_abandoned_work, ping
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.domain.budget import DatabaseBudget, database_budget
from users_grpc.domain.errors import StorageUnavailable
from users_grpc.domain.model import User
from users_grpc.ops.devdb import DevDatabase


def test_unreachable_database_is_storage_unavailable() -> None:
    async def main() -> None:
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            "mongodb://127.0.0.1:9/", serverSelectionTimeoutMS=200, connectTimeoutMS=200
        )
        try:
            with pytest.raises(StorageUnavailable):
                await MongoUserRepository(client["x"]).get("0" * 24)
        finally:
            await client.close()

    # On a loop of its own, ended before the leak below is collected: PyMongo's async monitor
    # leaks its socket when close() cancels it mid-connect (pool_shared._async_create_connection
    # closes only on OSError), and the loop's end is what lets it go.
    asyncio.run(main())
    collect_known_leaks()


async def test_a_budget_bounds_each_operation_and_never_outlasts_the_deadline(own_database: DevDatabase) -> None:
    """A database that stops answering fails the call at its budget, or at once past its deadline,
    as :class:`StorageUnavailable`; a live one answers within the budget."""
    assert DatabaseBudget(5).seconds() == 5
    assert DatabaseBudget(5, time.monotonic() + 100).seconds() == 5
    assert 1 < DatabaseBudget(5, time.monotonic() + 2).seconds() <= 2
    assert DatabaseBudget(5, time.monotonic() - 1).seconds() == 0.001

    async def bounded(budget: DatabaseBudget, users: MongoUserRepository, user_id: str) -> User | None:
        token = database_budget.set(budget)
        try:
            return await users.get(user_id)
        finally:
            database_budget.reset(token)

    client: AsyncMongoClient[Document] = AsyncMongoClient(own_database.uri, tz_aware=True)
    try:
        users = MongoUserRepository(client["budget"])
        user = await users.add(new_user())
        assert await bounded(DatabaseBudget(30, time.monotonic() + 30), users, user.id) == user
        with paused(own_database):
            for budget in (DatabaseBudget(0.2), DatabaseBudget(30, time.monotonic() - 1)):
                with pytest.raises(StorageUnavailable):
                    await asyncio.wait_for(bounded(budget, users, user.id), 10)
    finally:
        await client.close()


async def test_cancelled_calls_leave_their_work_to_end_and_shutdown_cancels_it(own_database: DevDatabase) -> None:
    # Abandoned work ends quietly: its outcome was reported to no one, and is not reported later.
    complaints: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: complaints.append(context))
    client: AsyncMongoClient[Document] = AsyncMongoClient(own_database.uri, tz_aware=True)
    try:
        users = MongoUserRepository(client["abandoned"])
        user = await users.add(new_user())
        assert await asyncio.wait_for(ping(client["abandoned"], 5), 10)
        with paused(own_database):
            assert not await asyncio.wait_for(ping(client["abandoned"], 0.2), 10)
            token = database_budget.set(DatabaseBudget(30))
            try:
                call = asyncio.ensure_future(users.get(user.id))
            finally:
                database_budget.reset(token)
            await asyncio.sleep(0)  # one turn of the loop: the call starts and waits on its work
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            [work] = list(calls._abandoned)
            assert not work.done()  # the call is gone; its work runs on within its budget
            await cancel_abandoned_work()
            assert work.cancelled()
            assert calls._abandoned == set()
            assert complaints == []
    finally:
        await client.close()
        loop.set_exception_handler(handler)
