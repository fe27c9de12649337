from __future__ import annotations

import logging

import pytest


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The services' log records, INFO and up (see tests/unit/logs.py)."""
    caplog.set_level(logging.INFO, logger="users_grpc")
    return caplog
