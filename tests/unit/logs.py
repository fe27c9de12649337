"""What the services log: security events, each once, with the ids an operator follows."""

from __future__ import annotations

import pytest


def logged(caplog: pytest.LogCaptureFixture, message: str, **extra: object) -> None:
    """Exactly one record says ``message``, carrying ``extra`` (its ``extra=`` fields)."""
    records = [r for r in caplog.records if r.getMessage() == message]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert {key: getattr(records[0], key, None) for key in extra} == extra
