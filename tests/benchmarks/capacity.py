"""Capacity model: how much storage, index memory and database work 1, 10 and 100 million users need.

Starts the FerretDB harness, an SMTP sink and the server, and drives real calls for a sample of
users: registration, activation, sign-in, one refresh, and MFA for every fourth user. It then
measures what those calls left in the database, as MongoDB would store it: the BSON size of
each document, and the size of each index entry (its key fields' BSON plus a 16-byte record
reference, before WiredTiger's prefix compression, so the figures err high). From those sizes
and the stated load it prints, per population, the data size, the index size (what must stay in
memory for lookups to avoid disk), and the database operations per second at the peak.

    .venv/bin/python -m tests.benchmarks.capacity [--users 40] [--sign-ins-per-day 2] [--peak-factor 4]

Rerun it when the schema changes; docs/scaling.md holds its last output.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
import pyotp
from aiosmtpd.controller import Controller
from pymongo import MongoClient, monitoring

from tests.support.calls import PASSWORD, create_request
from tests.support.database import start_ferretdb
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, make_settings
from tests.support.sockets import free_port
from users.v1 import user_service_pb2 as pb
from users_grpc.config import MIN_BCRYPT_ROUNDS

POPULATIONS = (1_000_000, 10_000_000, 100_000_000)
RECORD_REFERENCE_BYTES = 16  # the record id and entry header an index entry carries besides its key
DAY = 86_400
DATA_COMMANDS = {"find", "insert", "update", "delete", "findAndModify", "aggregate", "count"}


class CommandCounter(monitoring.CommandListener):
    """Counts the commands every client in this process sends, the in-process server's included."""

    def __init__(self) -> None:
        self.sent = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in DATA_COMMANDS:
            self.sent += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def fewest_commands(counter: CommandCounter, call: Callable[[], object], tries: int = 5) -> int:
    """The fewest commands one ``call`` sent in ``tries``: background jobs (mail, housekeeping) only add."""
    counts = []
    for _ in range(tries):
        before = counter.sent
        call()
        counts.append(counter.sent - before)
    return min(counts)


def drive(server: RunningServer, sink: MailSink, users: int) -> None:
    """Leave in the database what ``users`` people leave after their first day."""
    for n in range(users):
        name = f"capacity{n:05d}"
        email = f"{name}@example.com"
        server.anonymous.CreateUser(create_request(username=name, email=email))
        server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier=name, code=sink.code_for(email)))
        session = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier=name, password=PASSWORD))
        server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=session.refresh_token))
        if n % 4 == 0:
            own = server.stub_for(session.access_token)
            enrollment = own.EnableMfa(pb.EnableMfaRequest(user_id=session.user.id, password=PASSWORD))
            own.ConfirmMfa(pb.ConfirmMfaRequest(user_id=session.user.id, code=pyotp.TOTP(enrollment.secret).now()))


def operations_per_call(server: RunningServer, sink: MailSink, counter: CommandCounter) -> dict[str, int]:
    """Database commands of one sign-in, one refresh and one authenticated read, counted at the driver."""
    email = "counted@example.com"
    server.anonymous.CreateUser(create_request(username="counted", email=email))
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="counted", code=sink.code_for(email)))
    sign_in = pb.AuthenticateRequest(identifier="counted", password=PASSWORD)
    session = server.anonymous.Authenticate(sign_in)
    tokens = [session.refresh_token]

    def refresh() -> None:
        tokens.append(server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=tokens[-1])).refresh_token)

    own = server.stub_for(session.access_token)
    return {
        "sign-in": fewest_commands(counter, lambda: server.anonymous.Authenticate(sign_in)),
        "refresh": fewest_commands(counter, refresh),
        "read": fewest_commands(counter, lambda: own.GetUser(pb.GetUserRequest(id=session.user.id))),
    }


def index_entry_bytes(document: dict[str, Any], keys: dict[str, Any]) -> int:
    """The BSON size of the key one index holds for ``document`` (0 when a sparse index skips it)."""
    total = 0
    for field in keys:
        value: Any = document
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        # An element is a type byte, the name's C string and the value; the 5-byte document frame is not stored.
        total += len(bson.encode({"": value})) - 5
    return total + RECORD_REFERENCE_BYTES


def measure(client: MongoClient[dict[str, Any]], database: str) -> dict[str, tuple[int, float, float]]:
    """Per collection: documents, mean document bytes, mean index bytes per document (all indexes)."""
    sizes: dict[str, tuple[int, float, float]] = {}
    db = client[database]
    for name in sorted(db.list_collection_names()):
        documents = list(db[name].find())
        if not documents:
            continue
        indexes = [dict(index["key"]) for index in db[name].list_indexes()]
        document_bytes = [len(bson.encode(document)) for document in documents]
        index_bytes = [sum(index_entry_bytes(document, keys) for keys in indexes) for document in documents]
        sizes[name] = (len(documents), statistics.mean(document_bytes), statistics.mean(index_bytes))
    return sizes


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000:
            return f"{size:,.0f} {unit}"
        size /= 1000
    return f"{size:,.0f} PB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=40, help="users to create for the measurement")
    parser.add_argument("--sign-ins-per-day", type=float, default=2.0, help="per daily active user")
    parser.add_argument("--daily-active", type=float, default=0.2, help="share of users active on a day")
    parser.add_argument("--active-hours", type=float, default=8.0, help="hours a day an active user's client refreshes")
    parser.add_argument("--peak-factor", type=float, default=4.0, help="peak load over the daily mean")
    parser.add_argument("--sessions-per-user", type=float, default=2.0, help="live sessions a user keeps")
    parser.add_argument(
        "--changes-per-user-day", type=float, default=0.05, help="profile, email, role or state changes"
    )
    args = parser.parse_args()

    counter = CommandCounter()
    monitoring.register(counter)  # before the server's client exists, so that it reports too
    with tempfile.TemporaryDirectory() as directory:
        database = start_ferretdb(Path(directory))
        sink = MailSink()
        smtp = Controller(sink, hostname="127.0.0.1", port=free_port())
        smtp.start()
        settings = dataclasses.replace(
            make_settings(database.uri, f"capacity_{uuid.uuid4().hex[:8]}", smtp.port),
            bcrypt_rounds=MIN_BCRYPT_ROUNDS,  # measured at the production floor, not the suite's cost
        )
        server = RunningServer(settings, clock=None)
        client: MongoClient[dict[str, Any]] = MongoClient(database.uri, tz_aware=True)
        try:
            started = time.perf_counter()
            drive(server, sink, args.users)
            print(f"drove {args.users} users in {time.perf_counter() - started:.1f} s; access tokens live", end=" ")
            print(f"{settings.access_token_ttl_seconds} s, sessions {settings.session_ttl_seconds} s")
            sizes = measure(client, settings.mongodb_database)
            operations = operations_per_call(server, sink, counter)
        finally:
            client.close()
            server.stop()
            smtp.stop()
            database.stop()

    print()
    print("Measured, per document (BSON bytes; index bytes summed over the collection's indexes):")
    print(f"{'collection':<18} {'documents':>9} {'document':>9} {'indexes':>9}")
    for name, (count, document, index) in sizes.items():
        print(f"{name:<18} {count:>9} {document:>9.0f} {index:>9.0f}")

    users = sizes["users"]
    sessions = sizes.get("sessions", (0, 0.0, 0.0))
    # Collections that grow with users rather than with calls: tallies of known sign-in addresses,
    # and the claims on each user's username and email.
    for name in ("throttles", "claims"):
        count, document, index = sizes.get(name, (0, 0.0, 0.0))
        users = (users[0], users[1] + count / users[0] * document, users[2] + count / users[0] * index)
    audit = sizes.get("audit_events")
    changes = sizes.get("user_changes")
    per_user_data = users[1] + args.sessions_per_user * sessions[1]
    per_user_index = users[2] + args.sessions_per_user * sessions[2]
    sign_ins_per_user_day = args.daily_active * args.sign_ins_per_day
    refreshes_per_user_day = args.daily_active * args.active_hours * 3600 / settings.access_token_ttl_seconds
    # What lookups touch at random: the users', sessions', claims' and tallies' indexes. The audit
    # trail's and the change feed's are ordered by time, and only their recent end is read.
    per_user_hot_index = per_user_index
    if audit is not None:
        # Every sign-in writes one audit event, kept for the retention period.
        retained = sign_ins_per_user_day * settings.audit_retention_days
        per_user_data += retained * audit[1]
        per_user_index += retained * audit[2]
    if changes is not None:
        # The change feed keeps each change to a user (not sign-ins) for its retention period.
        retained = args.changes_per_user_day * settings.change_retention_days
        per_user_data += retained * changes[1]
        per_user_index += retained * changes[2]
    print()
    print(
        f"Model: {args.daily_active:.0%} of users active a day, {args.sign_ins_per_day:g} sign-ins each, their client"
        f" refreshing every {settings.access_token_ttl_seconds // 60} min for {args.active_hours:g} h;"
        f" {args.sessions_per_user:g} live sessions per user; {args.changes_per_user_day:g} changes per user a day;"
        f" audit events kept {settings.audit_retention_days} days, changes {settings.change_retention_days} days;"
        f" peak = {args.peak_factor:g}x the daily mean."
    )
    print(
        f"Measured database commands per call: sign-in {operations['sign-in']}, refresh {operations['refresh']},"
        f" authenticated read {operations['read']}."
    )
    print()
    print(f"{'users':>12} {'data':>9} {'indexes':>9} {'hot':>9} {'sign-ins/s':>11} {'refresh/s':>10} {'db ops/s':>9}")
    for population in POPULATIONS:
        sign_ins = population * sign_ins_per_user_day / DAY * args.peak_factor
        refreshes = population * refreshes_per_user_day / DAY * args.peak_factor
        commands = operations["sign-in"] * sign_ins + operations["refresh"] * refreshes
        print(
            f"{population:>12,} {human(population * per_user_data):>9} {human(population * per_user_index):>9}"
            f" {human(population * per_user_hot_index):>9}"
            f" {sign_ins:>11,.0f} {refreshes:>10,.0f} {commands:>9,.0f}"
        )


if __name__ == "__main__":
    main()
