"""What the repository tests share: every store of the service on a fresh database of the test's
own, indexes made, given to each async test on its own event loop (tests/support/event_loop.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from users_grpc.adapters.mongo.audit_trail import MongoAuditTrail
from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.claims import MongoClaims
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.groups import MongoGroupRepository
from users_grpc.adapters.mongo.housekeeping import MongoHousekeeping
from users_grpc.adapters.mongo.keys import MongoKeyMaterial, MongoKeyStore
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.mongo.schema import MongoSchema, ensure_indexes
from users_grpc.adapters.mongo.service_accounts import MongoServiceAccountRepository
from users_grpc.adapters.mongo.sessions import MongoSessionRepository
from users_grpc.adapters.mongo.throttles import MongoThrottleStore
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.ops.devdb import DevDatabase


def stop(database: DevDatabase) -> None:
    """SIGSTOP the database and wait until the kernel reports it stopped: a signal is delivered
    asynchronously, and on a loaded machine a call made at once could still be answered."""
    pid = database.process.pid
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, "the database did not stop"
        time.sleep(0.01)


@contextlib.contextmanager
def paused(database: DevDatabase) -> Iterator[None]:
    """The database stopped (SIGSTOP) until the block ends: connections stay open, nothing answers."""
    pid = database.process.pid
    try:
        stop(database)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Stores:
    def __init__(self, client: AsyncMongoClient[Document], name: str) -> None:
        self.client = client
        self.database = client[name]
        self.users = MongoUserRepository(self.database)
        self.changes = MongoChangeLog(self.database)
        self.claims = MongoClaims(self.database)
        self.schema = MongoSchema(self.database)
        self.sessions = MongoSessionRepository(self.database)
        self.keys = MongoKeyStore(self.database)
        self.key_material = MongoKeyMaterial(self.database)
        # The outbox's key, for tests that write mail as an earlier release sealed it.
        self.secrets = SecretsAtRest(os.urandom(32))
        self.outbox = MongoOutbox(self.database, self.secrets)
        self.throttle = MongoThrottleStore(self.database)
        self.audit = MongoAuditTrail(self.database, self.users)
        self.housekeeping = MongoHousekeeping(self.database)
        self.service_accounts = MongoServiceAccountRepository(self.database)
        self.groups = MongoGroupRepository(self.database)

    async def ensure_indexes(self) -> None:
        """The indexes the server makes at start-up, from the one list the server uses."""
        await ensure_indexes(
            users=self.users,
            outbox=self.outbox,
            sessions=self.sessions,
            throttles=self.throttle,
            service_accounts=self.service_accounts,
            audit_trail=self.audit,
            groups=self.groups,
        )


@pytest.fixture
async def stores(mongodb_uri: str, database_name: str) -> AsyncIterator[Stores]:
    """The stores on the test's own database, with the client on the test's event loop: an
    AsyncMongoClient is bound to the loop it first runs on, and each test has a loop of its own."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongodb_uri, tz_aware=True)
    try:
        stores = Stores(client, database_name)
        await stores.ensure_indexes()
        yield stores
    finally:
        # A shared database server (USERS_TEST_MONGODB_URI) keeps every database it was
        # given open (FerretDB holds a file each): leave none behind.
        await client.drop_database(database_name)
        await client.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Bounded below the suite's own limit: a database that stops answering fails the test in a
    # minute instead of hanging it for the whole timeout.
    for item in items:
        if "stores" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(60))
