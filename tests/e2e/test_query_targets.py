"""Every query targeted (issue 13): on a sharded cluster, each filter the servers send to a
collection that docs/scaling.md shards carries the shard key by equality (or ``$in``), so mongos
sends it to one shard (or the few that hold the values). The rest are declared below, each
with why it may go to every shard. Like the index check, it covers every command any test's
server sent in this session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.support.commands import CommandRecorder, Query, queries_of

# docs/scaling.md: the shard key of each sharded collection. The others stay unsharded.
SHARD_KEYS = {"users": "_id", "sessions": "_id", "throttles": "_id", "claims": "_id", "passkey_ceremonies": "_id"}


def fields(query_filter: Any) -> set[str]:
    """Every field a filter names, at any depth of ``$and``/``$or``."""
    if isinstance(query_filter, list):
        return set().union(*(fields(branch) for branch in query_filter))
    if not isinstance(query_filter, dict):
        return set()
    named = {key for key in query_filter if not key.startswith("$")}
    return named.union(*(fields(value) for key, value in query_filter.items() if key in ("$and", "$or")))


# Queries that may go to every shard, each with why: background work, admin-only listings, and
# per-user listings that are rare. Anything else on a sharded collection fails the check.
SCATTER_GATHER: list[tuple[str, Callable[[Query], bool]]] = [
    ("ListUsers pages (admin-only)", lambda q: q.collection == "users" and q.command == "find" and q.sort == ("_id",)),
    ("ListUsers' total_size and the count of active admins (admin-only)", lambda q: q.command == "aggregate"),
    (
        "whether any user exists, at start (limit 1); a migration's batches",
        lambda q: q.collection == "users" and q.command == "find" and not q.filter,
    ),
    (
        "below schema 2 (claims not complete yet), lookups by name go to users",
        lambda q: q.collection == "users" and {"username_key", "email_key"} <= fields(q.filter),
    ),
    (
        "the mail sender's sweeps for pending notices (background)",
        lambda q: q.collection == "users" and bool(fields(q.filter) & {"pending_mail_since", "pending_mail.id"}),
    ),
    (
        "housekeeping's purges (background)",
        lambda q: q.command == "delete" and fields(q.filter) in ({"expires_at"}, {"revoked_at"}),
    ),
    (
        "housekeeping's purge of accounts never activated (background)",
        lambda q: q.collection == "users" and "activation" in fields(q.filter) and "created_at" in fields(q.filter),
    ),
    (
        "housekeeping's sweep of claims left pending (background)",
        lambda q: q.collection == "claims" and "pending_since" in fields(q.filter),
    ),
    (
        "the change log's sweep for changes a crash left unpublished and deletions left unfinished (background)",
        # Only these two ranges: every other query carries deleting=None (a live user), and must be targeted.
        lambda q: (
            q.collection == "users"
            and set(q.filter) in ({"pending_changes_since"}, {"deleting"})
            and isinstance(next(iter(q.filter.values())), dict)
        ),
    ),
    (
        "one user's sessions: ListSessions and revoke-all (rare)",
        lambda q: q.collection == "sessions" and "user_id" in fields(q.filter),
    ),
    (
        "forgetting an account's tallies on a reset or an unlock (rare)",
        lambda q: q.collection == "throttles" and "account" in fields(q.filter),
    ),
]


def targeted(query_filter: dict[str, Any], key: str) -> bool:
    """Whether the filter pins ``key`` to one value or a list of values at its top level (or in
    every branch of a top-level ``$and``)."""
    condition = query_filter.get(key)
    if condition is not None:
        return not isinstance(condition, dict) or "$eq" in condition or "$in" in condition
    return any(targeted(branch, key) for branch in query_filter.get("$and", []))


@pytest.mark.after_the_suite
def test_every_query_on_a_sharded_collection_is_targeted_or_declared(suite_queries: CommandRecorder) -> None:
    queries = [query for command in suite_queries.commands for query in queries_of(command)]
    sharded = [query for query in queries if query.collection in SHARD_KEYS]
    assert any(query.collection == "users" for query in sharded), "no server sent a query to users"
    scattered: dict[tuple[str, str, tuple[str, ...]], Query] = {}
    for query in sharded:
        shape = (query.collection, query.command, tuple(sorted(fields(query.filter))))
        declared = any(matches(query) for _, matches in SCATTER_GATHER)
        if not targeted(query.filter, SHARD_KEYS[query.collection]) and not declared:
            scattered.setdefault(shape, query)
    assert not scattered, "\n".join(f"{shape}: {query.filter!r}" for shape, query in scattered.items())


def test_the_check_tells_targeted_filters_from_others() -> None:
    assert targeted({"_id": 1, "state": "active"}, "_id")
    assert targeted({"_id": {"$in": [1, 2]}}, "_id")
    assert targeted({"$and": [{"role": "admin"}, {"_id": 1}]}, "_id")
    assert not targeted({"_id": {"$gt": 1}}, "_id")
    assert not targeted({"username_key": "jane"}, "_id")
    assert not targeted({"$or": [{"_id": 1}, {"email_key": "x"}]}, "_id")
