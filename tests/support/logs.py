"""What the services log: security events, each once, with the ids an operator follows; pytest's
``caplog`` with the caller on each record, and ``log``, the services' records."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from users_grpc.grpc_api.logs import CallerContext


def logged(caplog: pytest.LogCaptureFixture, message: str, **extra: object) -> None:
    """Exactly one record says ``message``, carrying ``extra`` (its ``extra=`` fields)."""
    records = [r for r in caplog.records if r.getMessage() == message]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert {key: getattr(records[0], key, None) for key in extra} == extra


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """pytest's caplog, its records enriched with the caller as the service's own log handler does."""
    caller_context = CallerContext()
    handler = caplog.handler  # pytest's one capturing handler, shared by every test phase
    handler.addFilter(caller_context)
    yield caplog
    handler.removeFilter(caller_context)


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The services' log records, INFO and up (see :func:`logged`)."""
    caplog.set_level(logging.INFO, logger="users_grpc")
    return caplog
