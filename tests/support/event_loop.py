"""How the async tests run: anyio's pytest plugin (``anyio_mode = "auto"`` in pyproject.toml) runs
every ``async def test_...`` and async fixture on asyncio, a loop for each test, opened before its
first async fixture and closed after its last: no test sees another's loop or tasks."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The async tests run on asyncio, as the service does (anyio's plugin would try every backend)."""
    return "asyncio"
