"""Records the commands a server sends its database (PyMongo command monitoring), for tests that
count them or check them against the indexes."""

from __future__ import annotations

import copy
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pymongo import monitoring

from users_grpc.domain.budget import database_budget


@dataclass(frozen=True)
class Command:
    name: str
    database: str
    document: dict[str, Any]
    # Sent by a UserService call (the interceptor set its database budget), not by background work.
    in_call: bool


class CommandRecorder(monitoring.CommandListener):
    """Keeps the commands started (of the given names, or all); pass it to
    ``start_server(event_listeners=[...])``."""

    def __init__(self, names: Collection[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._commands: list[Command] = []
        self._failed: list[Command] = []
        self._names = names

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self._names is not None and event.command_name not in self._names:
            return
        self._keep(self._commands, event.command_name, event.database_name, dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        if self._names is None or event.command_name in self._names:
            self._keep(self._failed, event.command_name, event.database_name, {})

    def _keep(self, kept: list[Command], name: str, database: str, document: dict[str, Any]) -> None:
        # The async client calls listeners in the task that sends the command, so the call's
        # context variables are visible here.
        command = Command(
            name=name, database=database, document=copy.deepcopy(document), in_call=database_budget.get() is not None
        )
        with self._lock:
            kept.append(command)

    @property
    def commands(self) -> list[Command]:
        with self._lock:
            return list(self._commands)

    @property
    def failures(self) -> list[Command]:
        """The commands that failed (no document: only their names and where they ran)."""
        with self._lock:
            return list(self._failed)

    def clear(self) -> None:
        with self._lock:
            self._commands.clear()
            self._failed.clear()


# Commands that select documents by a filter, and where it is.
FILTERING = frozenset({"find", "update", "delete", "findAndModify", "count", "aggregate", "distinct"})
_SELECTIVE_OPERATORS = frozenset({"$eq", "$in", "$gt", "$gte", "$lt", "$lte", "$all", "$elemMatch"})


@dataclass(frozen=True)
class Query:
    collection: str
    command: str
    filter: dict[str, Any]
    sort: tuple[str, ...] = ()


def queries_of(command: Command) -> list[Query]:
    """The filters a command selects documents by (an update or delete command may carry several)."""
    document, name = command.document, command.name
    collection = str(document.get(name))
    if name == "find":
        return [Query(collection, name, document.get("filter", {}), tuple(document.get("sort", {})))]
    if name == "findAndModify":
        return [Query(collection, name, document.get("query", {}), tuple(document.get("sort", {})))]
    if name in ("count", "distinct"):
        return [Query(collection, name, document.get("query", {}))]
    if name == "update":
        return [Query(collection, name, update["q"]) for update in document["updates"]]
    if name == "delete":
        return [Query(collection, name, delete["q"]) for delete in document["deletes"]]
    if name == "aggregate":
        pipeline = document.get("pipeline", [])
        first = pipeline[0] if pipeline else {}
        return [Query(collection, name, first.get("$match", {}))]
    return []


def created_indexes(commands: list[Command]) -> dict[str, set[tuple[str, ...]]]:
    """The key fields of every index the recorded createIndexes commands made, by collection."""
    indexes: dict[str, set[tuple[str, ...]]] = {}
    for command in commands:
        if command.name == "createIndexes":
            collection = str(command.document["createIndexes"])
            for index in command.document["indexes"]:
                indexes.setdefault(collection, set()).add(tuple(index["key"]))
    return indexes


def constrained_fields(query_filter: dict[str, Any]) -> list[frozenset[str]]:
    """The fields a filter narrows by equality or range, as alternatives: one set for each way
    its ``$or`` branches can match. A field compared by ``$ne``, ``$nin``, ``$exists`` or ``$not``
    narrows nothing an index could seek to."""
    alternatives: list[frozenset[str]] = [frozenset()]
    for key, value in query_filter.items():
        if key in ("$and", "$or"):
            branches = [constrained_fields(branch) for branch in value]
            if key == "$and":
                for branch in branches:
                    alternatives = [a | b for a in alternatives for b in branch]
            else:
                alternatives = [a | b for a in alternatives for branch in branches for b in branch]
        elif key.startswith("$"):
            continue  # $nor, $expr, $comment: nothing an index seeks to
        elif _selective(value):
            alternatives = [a | {key} for a in alternatives]
    return alternatives


def _selective(condition: Any) -> bool:
    if not isinstance(condition, dict) or not any(str(key).startswith("$") for key in condition):
        return True  # equality with a value or an embedded document
    if "$regex" in condition:
        return str(condition["$regex"]).startswith("^")  # anchored: a prefix scan
    return bool(_SELECTIVE_OPERATORS & condition.keys())


def served(query: Query, indexes: set[tuple[str, ...]]) -> bool:
    """Whether every way the filter can match starts at the first key of an index (``_id``'s
    included); a find with no filter at all is served by an index that gives its sort order."""
    keys = {index[0] for index in indexes} | {"_id"}
    alternatives = constrained_fields(query.filter)
    if query.command == "find" and alternatives == [frozenset()] and query.sort:
        return query.sort[0] in keys
    return all(fields & keys for fields in alternatives)
