"""Records the commands a server sends its database (PyMongo command monitoring), for tests that
count them or check them against the indexes."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any

from pymongo import monitoring

from users_grpc.repository import database_budget


@dataclass(frozen=True)
class Command:
    name: str
    database: str
    document: dict[str, Any]
    # Sent by a UserService call (the interceptor set its database budget), not by background work.
    in_call: bool


class CommandRecorder(monitoring.CommandListener):
    """Keeps every command started; pass it to ``start_server(event_listeners=[...])``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: list[Command] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        # The async client calls listeners in the task that sends the command, so the call's
        # context variables are visible here.
        command = Command(
            name=event.command_name,
            database=event.database_name,
            document=copy.deepcopy(dict(event.command)),
            in_call=database_budget.get() is not None,
        )
        with self._lock:
            self._commands.append(command)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    @property
    def commands(self) -> list[Command]:
        with self._lock:
            return list(self._commands)

    def clear(self) -> None:
        with self._lock:
            self._commands.clear()
