"""The embedded database (dbharness) looks documents up by ``_id`` through an index.

FerretDB v1.24.2's SQLite backend indexes ``_id`` on one expression but looks documents up by
another, so without the index the harness adds, each lookup scans its collection's table. These
tests read the harness's SQLite files directly and ask SQLite for the plans of the exact
statements FerretDB runs (internal/backends/sqlite/collection.go: Query, UpdateAll, DeleteAll).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId, Regex
from pymongo import MongoClient

from tests.support.calls import create_request
from tests.support.database import start_ferretdb
from tests.support.paths import HARNESS
from tests.support.servers import StartServer
from users_grpc.ops.devdb import DevDatabase, start_dev_database

FERRETDB_ID_STATEMENTS = [
    # find, findAndModify, update and delete with a filter holding _id: <string or ObjectId>
    """SELECT _ferretdb_sjson FROM "{table}" WHERE _ferretdb_sjson->'$._id' = ? LIMIT ?""",
    # how every update and findAndModify writes its documents
    """UPDATE "{table}" SET _ferretdb_sjson = ? WHERE _ferretdb_sjson->'$._id' = ?""",
    # how every delete removes its documents
    """DELETE FROM "{table}" WHERE _ferretdb_sjson->'$._id' IN (?, ?)""",
]


def collection_tables(database_file: Path) -> dict[str, str]:
    """Each collection in a FerretDB database file, with its table."""
    with closing(sqlite3.connect(f"file:{database_file}?mode=ro", uri=True)) as connection:
        return dict(connection.execute("SELECT name, table_name FROM _ferretdb_collections").fetchall())


def unindexed_lookups(database_file: Path) -> list[str]:
    """FerretDB's ``_id`` statements, on every table of the file, that SQLite would not run through an index."""
    with closing(sqlite3.connect(f"file:{database_file}?mode=ro", uri=True)) as connection:
        tables = [table for (table,) in connection.execute("SELECT table_name FROM _ferretdb_collections")]
        assert tables, f"no collections in {database_file}"
        unindexed = []
        for table in tables:
            for statement in FERRETDB_ID_STATEMENTS:
                sql = statement.format(table=table)
                plan = [row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + sql, [None] * sql.count("?"))]
                if f"SEARCH {table} USING INDEX _ferretdb_id_{table} (<expr>=?)" not in plan:
                    unindexed.append(f"{sql}: {plan}")
        return unindexed


def test_every_collection_the_service_uses_is_looked_up_by_id_through_an_index(
    tmp_path: Path, own_database: DevDatabase, start_server: StartServer, database_name: str
) -> None:
    server = start_server(mongodb_uri=own_database.uri)  # signs its admin in: users, sessions, keys, ...
    server.anonymous.CreateUser(create_request())  # and the mail outbox

    database_file = tmp_path / "db" / f"{database_name}.sqlite"
    assert {"users", "sessions", "outbox"} <= collection_tables(database_file).keys()
    assert unindexed_lookups(database_file) == []


def test_a_filter_with_an_id_equality_beside_other_keys_reads_by_the_id_index(own_database: DevDatabase) -> None:
    """dbharness/patches/sqlite-pushdown.patch: unpatched, FerretDB reads by _id only for a filter
    that is exactly {_id}, and every update the service makes ({_id, precondition}) scans the table.
    Its explain shows the SQL plan of the same choice its queries make."""
    client: MongoClient[dict[str, Any]] = MongoClient(own_database.uri)
    with client:
        things = client.probe.things
        things.insert_many([{"_id": "a", "state": "active"}, {"_id": "b", "state": "locked"}])
        assert things.find_one({"_id": "a", "state": "active"}) == {"_id": "a", "state": "active"}
        assert things.find_one({"_id": "a", "state": "locked"}) is None  # the rest of the filter still applies
        for filter_ in ({"_id": "a"}, {"_id": "a", "state": "active"}, {"state": "active", "_id": "a"}):
            plan = client.probe.command("explain", {"find": "things", "filter": filter_})["queryPlanner"]["Plan"]
            assert any("USING INDEX _ferretdb_id_" in step for step in plan), (filter_, plan)
        plan = client.probe.command("explain", {"find": "things", "filter": {"state": "active"}})["queryPlanner"]
        assert not any("USING INDEX" in step for step in plan["Plan"])  # no _id: nothing to narrow by


def test_an_id_in_a_short_list_reads_by_the_id_index(own_database: DevDatabase) -> None:
    """The same patch: {_id: {$in: [...]}} of strings or ObjectIds (a throttle reads a source's
    counters so) reads those rows by the _id index; the rest of the filter still applies, and any
    other list is answered as before, by a scan."""
    client: MongoClient[dict[str, Any]] = MongoClient(own_database.uri)
    oid = ObjectId()
    with client:
        things = client.probe.things
        things.insert_many([{"_id": "a", "n": 1}, {"_id": "b", "n": 2}, {"_id": oid, "n": 3}, {"_id": 4, "n": 4}])

        def found(filter_: dict[str, Any]) -> list[Any]:
            return sorted((document["_id"] for document in things.find(filter_)), key=str)

        def indexed(filter_: dict[str, Any]) -> bool:
            plan = client.probe.command("explain", {"find": "things", "filter": filter_})["queryPlanner"]["Plan"]
            return any("USING INDEX _ferretdb_id_" in step for step in plan)

        by_list = {"_id": {"$in": ["a", oid, "z"]}}
        assert found(by_list) == sorted(["a", oid], key=str)
        assert indexed(by_list)
        narrowed = {"_id": {"$in": ["a", oid]}, "n": 3}
        assert found(narrowed) == [oid]
        assert indexed(narrowed)
        mixed = {"_id": {"$in": ["b", 4]}}  # a number: not narrowed by the patch, answered all the same
        assert found(mixed) == sorted(["b", 4], key=str)
        assert not indexed(mixed)
        assert found({"_id": {"$in": []}}) == []


def test_the_index_follows_collections_dropped_recreated_or_left_by_an_earlier_run(tmp_path: Path) -> None:
    data_dir = tmp_path / "db"
    database = start_ferretdb(data_dir)
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(database.uri)
        with client:
            client.probe.things.insert_one({"_id": "a"})
            client.probe.things.drop()
            client.probe.things.insert_one({"_id": "b"})  # the same collection name, a new table
            client.probe.create_collection("created")
            assert unindexed_lookups(data_dir / "probe.sqlite") == []

            client.drop_database("probe")
            client.probe.things.insert_one({"_id": "c"})  # a new file under the same name
            assert client.probe.things.find_one({"_id": "c"}) == {"_id": "c"}
            assert unindexed_lookups(data_dir / "probe.sqlite") == []
    finally:
        database.stop()

    # A file written by a harness that did not index lookups yet.
    table = collection_tables(data_dir / "probe.sqlite")["things"]
    with closing(sqlite3.connect(data_dir / "probe.sqlite")) as connection:
        connection.execute(f'DROP INDEX "_ferretdb_id_{table}"')
    assert unindexed_lookups(data_dir / "probe.sqlite") != []

    database = start_ferretdb(data_dir)
    try:
        assert unindexed_lookups(data_dir / "probe.sqlite") == []
    finally:
        database.stop()


def test_a_database_without_a_data_dir_is_indexed_too_and_removed_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the harness makes its throwaway directory
    database = start_dev_database(data_dir=None, binary=HARNESS)
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(database.uri)
        with client:
            client.probe.things.insert_one({"_id": "a"})
        (directory,) = tmp_path.glob("dbharness-*")
        assert unindexed_lookups(directory / "probe.sqlite") == []
    finally:
        database.stop()
    assert not directory.exists()


# The harness's narrowings (dbharness/patches/sqlite-pushdown.patch, pushdown.go) may read fewer
# rows, never other answers: each filter below is answered once as given and once wrapped in a
# double $nor, which means the same to MongoDB but which the patch does not narrow, so FerretDB
# reads every row and matches in Go, as unpatched. The documents hold every kind of value the
# narrowings have to get right: arrays holding the value, other types beside it, escapes, a
# prefix's neighbours, missing fields and nulls, _ids that are not ObjectIds.
OIDS = [ObjectId(f"{n:024x}") for n in (0x10, 0x20, 0x30)]
DATES = [datetime(2001, 9, 9, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC), datetime(1999, 1, 1, tzinfo=UTC)]
VALUES: list[Any] = [
    "user",
    "admin",
    "us",
    "user!",
    "use",
    "User",
    "a<b&c",
    'q"uote',
    "ünï",
    "[x",
    "\\x",
    "",
    *OIDS,
    *DATES,
    True,
    False,
    None,
    5,
    5.0,
    -1,
    {"nested": "user"},
    ["user", "x"],
    [OIDS[0]],
    [DATES[0]],
    [],
    ["[x"],
]


def varied_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for n, value in enumerate(VALUES):
        other = VALUES[(n * 7 + 3) % len(VALUES)]
        # t and s: one type in every document (with ties), so that sorts on them come from SQL
        document: dict[str, Any] = {
            "_id": ObjectId(f"{0x100 + n:024x}"),
            "a": value,
            "b": other,
            "t": DATES[n % 3],
            "s": f"s{n % 4}",
        }
        if n % 5 == 0:
            del document["b"]
        documents.append(document)
    more: list[dict[str, Any]] = [
        {"_id": "string-id", "a": "user"},
        {"_id": 7, "a": "user"},
        {"_id": OIDS[1], "b": "user"},
    ]
    documents += [document | {"t": DATES[0], "s": "s0"} for document in more]
    return documents


def varied_filters() -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = []
    for value in ["user", "a<b&c", 'q"uote', "ünï", "[x", "", OIDS[0], DATES[0], True, False]:
        filters += [{"a": value}, {"b": value, "a": {"$exists": True}}, {"$and": [{"a": value}, {"deleting": None}]}]
    for bound in ["use", "user", OIDS[1], DATES[0], DATES[2]]:
        for op in ("$gt", "$gte", "$lt", "$lte"):
            filters.append({"a": {op: bound}})
        filters.append({"a": {"$gte": bound, "$lt": "zzz" if isinstance(bound, str) else bound}})
    for pattern in ["^us", "^user", "^\\[", "^a<", '^q"', "^U", "^us.r", "^"]:
        filters += [{"a": {"$regex": pattern}}, {"$or": [{"a": {"$regex": pattern}}, {"b": {"$regex": pattern}}]}]
    filters += [{"a": Regex("^us")}, {"a": Regex("^us", "i")}, {"a": {"$regex": "^us", "$options": "i"}}]
    for bound in [OIDS[0], ObjectId(f"{0x108:024x}")]:
        filters += [
            {"_id": {"$gt": bound}},
            {"$and": [{"a": "user"}, {"_id": {"$gt": bound}}]},
            {"$and": [{"$or": [{"a": "user"}, {"b": "user"}]}, {"_id": {"$lte": bound}}]},
        ]
    filters += [
        {},
        {"_id": "string-id", "a": "user"},
        {"_id": {"$in": [OIDS[1], "string-id", 7]}},
        {"$or": [{"a": "user"}, {"a": {"$ne": "user"}}]},  # a branch that does not narrow: the $or does not
        {"a": "user", "b": "user"},
        {"a": ["user", "x"]},
        {"a": None},
        {"b": None},
        {"$and": [{"b": None}, {"a": {"$regex": "^us"}}]},
        {"$or": [{"a": True}, {"b": None}]},
        {"a": 5},
    ]
    return filters


SORTS: list[tuple[list[tuple[str, int]] | None, int]] = [
    (None, 0),
    ([("_id", 1)], 0),
    ([("_id", -1)], 0),
    ([("_id", 1)], 3),
    ([("_id", -1)], 2),
    ([("t", -1), ("_id", -1)], 0),
    ([("t", -1), ("_id", -1)], 4),
    ([("s", 1), ("t", -1), ("_id", 1)], 5),
    ([("a", 1), ("_id", 1)], 3),  # a holds every type: sorted in Go
]


def answers(things: Any, filter_: dict[str, Any], sort: list[tuple[str, int]] | None, limit: int) -> list[Any]:
    cursor = things.find(filter_)
    if sort is not None:
        cursor = cursor.sort(sort)
    if limit:
        cursor = cursor.limit(limit)
    found = [document["_id"] for document in cursor]
    return found if sort is not None else sorted(found, key=repr)


@pytest.mark.parametrize(
    ("odd_ids", "arrays"),
    [(False, True), (True, True), (False, False)],
    ids=["ObjectId ids", "other ids too", "no arrays"],  # the last: counts in SQL, no array to see
)
def test_narrowed_filters_id_orders_and_counts_answer_as_a_full_read_does(
    own_database: DevDatabase, odd_ids: bool, arrays: bool
) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(own_database.uri, tz_aware=True)
    with client:
        things = client.probe.things
        things.create_index([("a", 1)], name="a")
        things.create_index([("b", 1), ("_id", 1)], name="b_id")
        things.create_index([("t", -1), ("_id", -1)], name="t_id")
        things.create_index([("s", 1), ("t", -1), ("_id", 1)], name="s_t_id")
        documents = [
            d
            for d in varied_documents()
            if (odd_ids or isinstance(d["_id"], ObjectId))
            # "[x" reads as an array might: a count beside it is not made in SQL either
            and (arrays or not any(isinstance(value, list) or value == "[x" for value in d.values()))
        ]
        things.insert_many(documents)
        checked = 0
        for filter_ in varied_filters():
            full_read = {"$nor": [{"$nor": [filter_]}]}
            for sort, limit in SORTS:
                assert answers(things, filter_, sort, limit) == answers(things, full_read, sort, limit), (filter_, sort)
                checked += 1
            assert things.count_documents(filter_) == things.count_documents(full_read), filter_
        assert checked > 500


def test_the_harness_indexes_serve_equalities_ranges_prefixes_and_id_order(own_database: DevDatabase) -> None:
    """What the narrowings are for: FerretDB's explain shows the SQL plan of the same choice its
    queries make; each filter shape the service sends reads through an index of the harness's."""
    client: MongoClient[dict[str, Any]] = MongoClient(own_database.uri, tz_aware=True)
    with client:
        things = client.probe.things
        things.create_index([("role", 1), ("_id", 1)], name="role_id")
        things.create_index([("key", 1)], name="key")
        things.create_index([("at", 1)], name="at")
        things.insert_many([{"role": "user", "key": f"k{n}", "at": DATES[1]} for n in range(20)])

        def plan(filter_: dict[str, Any]) -> list[str]:
            explained = client.probe.command("explain", {"find": "things", "filter": filter_})
            return list(explained["queryPlanner"]["Plan"])

        def searches(filter_: dict[str, Any], index: str) -> bool:
            return any(
                "USING INDEX _ferretdb_ix_" in step and step.endswith(")") and f"_{index} (" in step
                for step in plan(filter_)
            )

        live = {"deleting": None}
        assert searches({"$and": [live, {"role": "user"}]}, "role_id")
        assert searches({"$and": [live, {"role": "user"}, {"_id": {"$gt": ObjectId()}}]}, "role_id")
        assert searches({"$or": [{"key": "k1"}, {"key": {"$regex": "^k"}}], **live}, "key")
        assert searches({"at": {"$lt": DATES[1]}}, "at")
        assert not any("USING INDEX" in step for step in plan({"other": "user"}))  # no index of the service's
