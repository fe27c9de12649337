"""The database time budget of one call, owned below both of its users: the call pipeline's guard
sets it for each call (pipeline/guard.py), the MongoDB adapter spends it (adapters/mongo).
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class DatabaseBudget:
    """How long one call's database work may take: each repository call at most
    ``per_operation`` seconds, and none past the call's ``deadline`` (``time.monotonic()``).

    Per operation, not per call: time a call spends hashing a password or waiting for a
    hashing thread must not eat into its database time, or a busy server would report a
    healthy database as unavailable.
    """

    per_operation: float
    deadline: float | None = None

    def seconds(self) -> float:
        if self.deadline is None:
            return self.per_operation
        return max(min(self.per_operation, self.deadline - time.monotonic()), 0.001)


database_budget: ContextVar[DatabaseBudget | None] = ContextVar("database_budget", default=None)
"""Set by the pipeline's guard for each call; outside calls the client's own timeout applies."""
