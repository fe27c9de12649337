"""Benchmark: how do lookups on the embedded database (FerretDB on SQLite) grow with users?

Starts the FerretDB harness, an SMTP sink and the server, then grows the users collection to
each size by inserting documents straight into the database: copies of one real user's document
with new ids, names and addresses, all with that user's password hash (bcrypt for 100,000 users
would take hours). At each size it times, one call at a time, GetUser (each user with their own
access token), GetUserByIdentifier (as an admin) and Authenticate (bcrypt at the test cost, 10),
spread over users across the whole collection, and prints each p50 with its ratio to the
smallest size's.

    .venv/bin/python -m tests.benchmarks.embedded_scale [--sizes 1000,10000,100000] [--calls 30]

USERS_DEV_DB_BINARY picks another harness binary, to compare two builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo import MongoClient

from bench.seed import seed_users
from tests.support.database import start_ferretdb
from tests.support.mail import MailSink, SocketController
from tests.support.paths import HARNESS
from tests.support.servers import ADMIN_PASSWORD, RunningServer, make_settings
from users.v1 import user_service_pb2 as pb
from users_grpc.config import MIN_BCRYPT_ROUNDS

TARGETS = 10  # users the calls go round, spread evenly over the collection


def p50(call: Callable[[int], object], calls: int) -> float:
    """The median latency, in milliseconds, of ``call(0)`` … ``call(calls - 1)`` after one untimed call."""
    call(0)
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        call(n)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def username(n: int) -> str:
    return f"user{n:06d}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="user counts, ascending, comma-separated")
    parser.add_argument("--calls", type=int, default=30, help="timed calls of each kind at each size")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    assert sizes == sorted(sizes), "sizes must ascend"
    assert sizes[0] > TARGETS, f"sizes must be above {TARGETS}, the number of users called"

    print(f"{os.cpu_count()} cores, {cpu_model()}; harness {os.environ.get('USERS_DEV_DB_BINARY', HARNESS)}")
    rows: list[tuple[int, float, float, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        database = start_ferretdb(Path(directory))
        sink = MailSink()
        smtp = SocketController(sink)
        smtp.start()
        settings = dataclasses.replace(
            make_settings(database.uri, f"bench_{uuid.uuid4().hex[:8]}", smtp.port),
            # Before its indexes worked, one lookup at 100,000 users took seconds on the harness.
            db_timeout_seconds=60.0,
            bcrypt_rounds=MIN_BCRYPT_ROUNDS,  # measured at the production floor, not the suite's cost
        )
        server = RunningServer(settings, clock=None)
        client: MongoClient[dict[str, Any]] = MongoClient(database.uri, tz_aware=True)
        try:
            service_database = client[settings.mongodb_database]
            admin = service_database["users"].find_one({"_id": ObjectId(server.admin_id)})
            assert admin is not None
            seeded = 0
            for size in sizes:
                started = time.perf_counter()
                seed_users(service_database, admin, [username(n) for n in range(seeded, size)])
                print(f"seeded {size - seeded:,} users in {time.perf_counter() - started:.1f} s", flush=True)
                seeded = size
                targets = [username((2 * k + 1) * size // (2 * TARGETS)) for k in range(TARGETS)]

                signed_in: dict[str, pb.AuthenticateResponse] = {}

                def authenticate(n: int, targets: list[str] = targets, signed_in: dict[str, Any] = signed_in) -> None:
                    name = targets[n % TARGETS]
                    signed_in[name] = server.anonymous.Authenticate(
                        pb.AuthenticateRequest(identifier=name, password=ADMIN_PASSWORD)
                    )

                authenticate_p50 = p50(authenticate, args.calls)
                for name in targets:  # every target holds a token, whatever the number of calls
                    if name not in signed_in:
                        authenticate(targets.index(name))
                own = [(server.stub_for(signed_in[name].access_token), signed_in[name].user.id) for name in targets]

                def get_user(n: int, own: list[tuple[Any, str]] = own) -> None:
                    stub, user_id = own[n % TARGETS]
                    stub.GetUser(pb.GetUserRequest(id=user_id))

                def get_user_by_identifier(n: int, targets: list[str] = targets) -> None:
                    server.stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=targets[n % TARGETS]))

                get_user_p50 = p50(get_user, args.calls)
                by_identifier_p50 = p50(get_user_by_identifier, args.calls)
                rows.append((size, get_user_p50, by_identifier_p50, authenticate_p50))
                print(
                    f"{size:,} users: GetUser {get_user_p50:.2f} ms, GetUserByIdentifier {by_identifier_p50:.2f} ms,"
                    f" Authenticate {authenticate_p50:.2f} ms",
                    flush=True,
                )
        finally:
            client.close()
            server.stop()
            smtp.stop()
            database.stop()

    base = rows[0]
    print()
    print(f"p50 of {args.calls} calls each, one at a time; (x) is the ratio to {base[0]:,} users")
    print(f"{'users':>9}  {'GetUser':>20}  {'GetUserByIdentifier':>20}  {'Authenticate':>20}")
    for size, *figures in rows:
        cells = [f"{value:9.2f} ms ({value / first:6.1f}x)" for value, first in zip(figures, base[1:], strict=True)]
        print(f"{size:>9,}  " + "  ".join(f"{cell:>20}" for cell in cells))


if __name__ == "__main__":
    main()
