"""What the repository tests share: every store of the service on a fresh database of the test's
own, indexes made, and a runner that gives a test body an event loop of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pymongo import AsyncMongoClient

from users_grpc.devdb import DevDatabase
from users_grpc.repository import (
    Document,
    MongoAuditTrail,
    MongoHousekeeping,
    MongoKeyStore,
    MongoOutbox,
    MongoServiceAccountRepository,
    MongoSessionRepository,
    MongoThrottleStore,
    MongoUserRepository,
)
from users_grpc.secrets_at_rest import SecretsAtRest

_T = TypeVar("_T")


@contextlib.contextmanager
def paused(database: DevDatabase) -> Iterator[None]:
    """The database stopped (SIGSTOP) until the block ends: connections stay open, nothing answers.
    Waits until the kernel reports it stopped, since a signal is delivered asynchronously."""
    pid = database.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
            assert time.monotonic() < deadline, "the database did not stop"
            time.sleep(0.01)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Stores:
    def __init__(self, client: AsyncMongoClient[Document], name: str) -> None:
        self.client = client
        self.database = client[name]
        self.users = MongoUserRepository(self.database)
        self.sessions = MongoSessionRepository(self.database)
        self.keys = MongoKeyStore(self.database)
        self.outbox = MongoOutbox(self.database, SecretsAtRest(os.urandom(32)))
        self.throttle = MongoThrottleStore(self.database)
        self.audit = MongoAuditTrail(self.database, self.users)
        self.housekeeping = MongoHousekeeping(self.database)
        self.service_accounts = MongoServiceAccountRepository(self.database)

    async def ensure_indexes(self) -> None:
        """The indexes the server makes at start-up (bootstrap), every store's."""
        for store in (self.users, self.sessions, self.outbox, self.throttle, self.audit, self.service_accounts):
            await store.ensure_indexes()


@pytest.fixture
def run(mongodb_uri: str, database_name: str) -> Callable[[Callable[[Stores], Awaitable[_T]]], _T]:
    """Run a test body with the stores on its own database."""

    def runner(body: Callable[[Stores], Awaitable[_T]]) -> _T:
        async def main() -> _T:
            client: AsyncMongoClient[Document] = AsyncMongoClient(mongodb_uri, tz_aware=True)
            try:
                stores = Stores(client, database_name)
                await stores.ensure_indexes()
                return await body(stores)
            finally:
                # A shared database server (USERS_TEST_MONGODB_URI) keeps every database it was
                # given open (FerretDB holds a file each): leave none behind.
                await client.drop_database(database_name)
                await client.close()

        # Bounded: a database that stops answering fails the test instead of hanging it.
        return asyncio.run(asyncio.wait_for(main(), 60))

    return runner
