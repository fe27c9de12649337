"""The suite's fixtures, registered for every test folder: each is defined in tests/support/,
with the helpers that go with it (see tests/support/__init__.py)."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.support.database",
    "tests.support.event_loop",
    "tests.support.mail",
    "tests.support.servers",
    "tests.support.pki",
    "tests.support.stores",
    "tests.support.logs",
    "tests.support.browser",
    "tests.support.pwned_range",
    "tests.support.builds",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The check of every query the suite sent runs once the rest of the suite has sent them.
    last = [item for item in items if item.get_closest_marker("after_the_suite")]
    items[:] = [item for item in items if item not in last] + last


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "after_the_suite: run after every other test of the session")
