"""The database the tests run against: the FerretDB harness (dbharness), one for the session and
one of a test's own, and a fresh database name for each test.

Set USERS_TEST_MONGODB_URI to run the same tests against a real MongoDB instead.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import HARNESS
from users_grpc.ops.devdb import DevDatabase, start_dev_database


def start_ferretdb(data_dir: Path) -> DevDatabase:
    return start_dev_database(data_dir=data_dir, binary=HARNESS)


@pytest.fixture
def own_database(tmp_path: Path) -> Iterator[DevDatabase]:
    """A FerretDB process of this test's own, to pause (SIGSTOP), resume or kill."""
    database = start_ferretdb(tmp_path / "db")
    yield database
    if database.process.poll() is None:
        os.kill(database.process.pid, signal.SIGCONT)
    database.stop()


@pytest.fixture(scope="session")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("USERS_TEST_MONGODB_URI")
    if external:
        yield external
        return
    database = start_ferretdb(tmp_path_factory.mktemp("ferretdb"))
    yield database.uri
    database.stop()


@pytest.fixture
def database_name() -> str:
    """A fresh database for each test, so tests never see each other's data."""
    return f"test_{uuid.uuid4().hex[:16]}"
