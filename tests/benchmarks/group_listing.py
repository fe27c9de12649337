"""Benchmark: does a page of a group's members cost the same at 10,000 members as at 1,000?

Starts the FerretDB harness, an SMTP sink and the server, seeds users straight into the database
(copies of the server's admin, as tests/benchmarks/embedded_scale.py does) and, for each size, one
group with that many members (the membership documents AddGroupMember writes, inserted directly:
10,000 calls would measure the seeding). At each size it times, one call at a time, the first and
the last page of ListGroupMembers (pages of 1,000, keyset by user id), the whole group in those
pages, and ListUserGroups of one member, and prints each p50 with its ratio to the smallest
group's (a page of 1,000 of either: the ratio is what the group's size adds; the whole group is
that many pages). Last, it deletes the largest group and times one housekeeping sweep of its memberships
(a batch of 1,000, each with its change in the feed).

    .venv/bin/python -m tests.benchmarks.group_listing [--sizes 1000,10000] [--calls 10]

USERS_DEV_DB_BINARY picks another harness binary, to compare two builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo import MongoClient

from bench.seed import seed_users
from tests.benchmarks.embedded_scale import cpu_model, username
from tests.support.database import start_ferretdb
from tests.support.mail import MailSink, SocketController
from tests.support.paths import HARNESS
from tests.support.servers import RunningServer, make_settings
from users.v1 import group_pb2 as gpb
from users_grpc.config import MIN_BCRYPT_ROUNDS
from users_grpc.services.groups import MAX_PAGE_SIZE, SWEEP_BATCH

COLUMNS = ("first page", "last page", "whole group", "ListUserGroups")


def p50(call: Callable[[], object], calls: int) -> float:
    """The median latency, in milliseconds, of ``calls`` calls after one untimed call."""
    call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def seed_group(server: RunningServer, database: Any, size: int) -> tuple[str, list[ObjectId]]:
    """A group made through the service, with the first ``size`` seeded users as members."""
    group_id = server.stub.CreateGroup(gpb.CreateGroupRequest(name=f"group of {size}")).group.id
    names = [username(n) for n in range(size)]
    users = [document["_id"] for document in database["users"].find({"username": {"$in": names}}, {"_id": 1})]
    now = datetime.now(UTC)
    for first in range(0, len(users), 1000):
        database["group_members"].insert_many(
            [
                {"user_id": user_id, "group_id": ObjectId(group_id), "created_at": now}
                for user_id in users[first:][:1000]
            ]
        )
    return group_id, sorted(users)


def last_page_token(server: RunningServer, group_id: str) -> str:
    """The page token of the group's last page of MAX_PAGE_SIZE ("" when it has one page)."""
    token, previous = "", ""
    while True:
        reply = server.stub.ListGroupMembers(
            gpb.ListGroupMembersRequest(group_id=group_id, page_size=MAX_PAGE_SIZE, page_token=token)
        )
        if not reply.next_page_token:
            return token if token else previous
        previous, token = token, reply.next_page_token


def whole_group(server: RunningServer, group_id: str) -> int:
    members, token = 0, ""
    while True:
        reply = server.stub.ListGroupMembers(
            gpb.ListGroupMembersRequest(group_id=group_id, page_size=MAX_PAGE_SIZE, page_token=token)
        )
        members += len(reply.members)
        token = reply.next_page_token
        if not token:
            return members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="group sizes, ascending, comma-separated")
    parser.add_argument("--calls", type=int, default=10, help="timed calls of each kind at each size")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    assert sizes == sorted(sizes), "sizes must ascend"

    print(f"{os.cpu_count()} cores, {cpu_model()}; harness {os.environ.get('USERS_DEV_DB_BINARY', HARNESS)}")
    figures: list[list[float]] = []
    with tempfile.TemporaryDirectory() as directory:
        database = start_ferretdb(Path(directory))
        smtp = SocketController(MailSink())
        smtp.start()
        settings = dataclasses.replace(
            make_settings(database.uri, f"bench_{uuid.uuid4().hex[:8]}", smtp.port),
            db_timeout_seconds=60.0,
            bcrypt_rounds=MIN_BCRYPT_ROUNDS,  # measured at the production floor, not the suite's cost
            # Housekeeping runs once at start only: the sweep below is timed on its own.
            housekeeping_interval_seconds=3600,
        )
        server = RunningServer(settings, clock=None)
        client: MongoClient[dict[str, Any]] = MongoClient(database.uri, tz_aware=True)
        try:
            service_database = client[settings.mongodb_database]
            admin = service_database["users"].find_one({"_id": ObjectId(server.admin_id)})
            assert admin is not None
            started = time.perf_counter()
            seed_users(service_database, admin, [username(n) for n in range(sizes[-1])])
            print(f"seeded {sizes[-1]:,} users in {time.perf_counter() - started:.1f} s", flush=True)
            group_id = ""
            for size in sizes:
                started = time.perf_counter()
                group_id, members = seed_group(server, service_database, size)
                print(f"seeded a group of {size:,} in {time.perf_counter() - started:.1f} s", flush=True)
                last = last_page_token(server, group_id)
                member = str(members[len(members) // 2])

                def first_page(group_id: str = group_id) -> None:
                    request = gpb.ListGroupMembersRequest(group_id=group_id, page_size=MAX_PAGE_SIZE)
                    server.stub.ListGroupMembers(request)

                def last_page(group_id: str = group_id, token: str = last) -> None:
                    request = gpb.ListGroupMembersRequest(group_id=group_id, page_size=MAX_PAGE_SIZE, page_token=token)
                    server.stub.ListGroupMembers(request)

                def listed(group_id: str = group_id, size: int = size) -> None:
                    assert whole_group(server, group_id) == size

                def groups_of(member: str = member) -> None:
                    server.stub.ListUserGroups(gpb.ListUserGroupsRequest(user_id=member))

                figures.append(
                    [
                        p50(first_page, args.calls),
                        p50(last_page, args.calls),
                        p50(listed, max(1, args.calls // 3)),
                        p50(groups_of, args.calls),
                    ]
                )
                print(
                    f"{size:,} members: "
                    + ", ".join(f"{c} {v:.2f} ms" for c, v in zip(COLUMNS, figures[-1], strict=True)),
                    flush=True,
                )
            server.stub.DeleteGroup(gpb.DeleteGroupRequest(group_id=group_id))
            started = time.perf_counter()
            swept = server.call(server.app.services.groups.sweep_deleted(), timeout=600)
            sweep_seconds = time.perf_counter() - started
        finally:
            client.close()
            server.stop()
            smtp.stop()
            database.stop()

    base = figures[0]
    print()
    print(
        f"p50 of {args.calls} calls each ({max(1, args.calls // 3)} of the whole group), one at a time, pages of "
        f"{MAX_PAGE_SIZE:,}; (x) is the ratio to the group of {sizes[0]:,}"
    )
    print(f"{'members':>9}  " + "  ".join(f"{c:>22}" for c in COLUMNS))
    for size, row in zip(sizes, figures, strict=True):
        cells = [f"{value:10.2f} ms ({value / first:6.1f}x)" for value, first in zip(row, base, strict=True)]
        print(f"{size:>9,}  " + "  ".join(f"{cell:>22}" for cell in cells))
    print(
        f"one housekeeping sweep after deleting the group of {sizes[-1]:,}: {swept:,} memberships "
        f"(batch {SWEEP_BATCH:,}) in {sweep_seconds:.1f} s, {sweep_seconds / max(swept, 1) * 1000:.2f} ms each"
    )


if __name__ == "__main__":
    main()
