"""Load benchmark: the embedded database and the server, driven by ghz, figures beside baselines.

Starts the embedded FerretDB and the server (``users-grpc serve``, a process of its own), seeds
users straight into the database (copies of one real account with its bcrypt hash: hashing
100,000 passwords would take hours), drives each call with ghz and prints one table. Each figure
stands beside a baseline measured in the same run: the health ``Check`` for cheap calls, and the
hashing ceiling (cores ÷ one bcrypt verification at the configured cost) for sign-ins. CPU per
call is user+system time from /proc, for the server and the database process apart.

    .venv/bin/python -m bench                 # about 5 minutes, 12,000 users
    .venv/bin/python -m bench --five-minutes  # the resident-memory figure after 5 minutes of mixed load
    .venv/bin/python -m bench --smoke         # seconds: checks the harness runs (the test suite does)
    .venv/bin/python -m bench --users 100000 --quick  # a few minutes, most of them seeding
    .venv/bin/python -m bench --quick --users 1000 --workers 1,2,1,2  # the GetUser and ListUsers rows by worker count
    .venv/bin/python -m bench --users 1000 --coalescing  # GetUser with USERS_COALESCE_READS on and off

USERS_DEV_DB_BINARY names another harness binary (dbharness/bin/dbharness by default), to compare
two builds of it.

ghz comes from .ci/setup (.tools/bin/ghz); USERS_BENCH_GHZ names another binary.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import MongoClient

from bench.seed import seed_users
from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc
from users_grpc.domain.rules import identifier_key
from users_grpc.ops.devdb import DevDatabase, start_dev_database
from users_grpc.services.tokens import new_key_encryption_key

ROOT = Path(__file__).resolve().parent.parent
GHZ = Path(os.environ.get("USERS_BENCH_GHZ", ROOT / ".tools/bin/ghz"))
HARNESS = Path(os.environ.get("USERS_DEV_DB_BINARY", ROOT / "dbharness/bin/dbharness"))
PASSWORD = "benchmark passphrase, not a secret"
SERVICE = "users.v1.UserService"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Seeded users take one of this many tenants (an admin-scope metadata entry), in turn.
TENANTS = 100


@dataclass(frozen=True)
class Profile:
    users: int  # seeded straight into the database
    bcrypt_rounds: int
    seconds: float  # each measured ghz run
    concurrency: int  # cheap calls in flight (the figures used 32)
    sign_in_concurrency: int
    mixed_seconds: float  # mixed load before the resident-memory reading
    token_users: int  # users signed in for GetUser, each calling with their own token
    fixed_rate: int  # GetUser calls a second, alone and while sign-ins keep hashing busy
    page_size: int
    deep_page: int
    list_calls: int  # ListUsers and ListAuditEvents calls for each of their rows
    idle_seconds: float = 10  # the server left to its background work, its database's CPU read
    # Fixed numbers of calls instead of fixed times, so that a slow machine still yields every row.
    cheap_calls: int | None = None
    sign_in_calls: int | None = None


FULL = Profile(
    users=12_000,
    bcrypt_rounds=12,
    seconds=10,
    concurrency=32,
    sign_in_concurrency=8,
    mixed_seconds=60,
    token_users=16,
    fixed_rate=100,
    page_size=10,
    deep_page=1000,
    list_calls=3,
    sign_in_calls=32,
)
SMOKE = Profile(
    users=200,
    bcrypt_rounds=10,
    seconds=0.5,
    concurrency=8,
    sign_in_concurrency=2,
    mixed_seconds=1,
    token_users=2,
    fixed_rate=50,
    page_size=10,
    deep_page=19,
    list_calls=3,
    cheap_calls=100,
    sign_in_calls=4,
    idle_seconds=1,
)


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user+system, every thread) of the server and the database process."""

    server: float
    database: float


@dataclass(frozen=True)
class Row:
    name: str
    calls: int
    errors: int
    per_second: float
    p50_ms: float
    p99_ms: float
    server_us: float
    database_us: float


def cpu_seconds(pid: int) -> float:
    # Fields after the command name (which may hold spaces): state is the 3rd, utime the 14th, stime the 15th.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (a server's workers, users_grpc/workers.py)."""
    found = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found += process_tree(int(child))
    return found


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Bench:
    def __init__(self, profile: Profile, work: Path, workers: int = 1) -> None:
        self.profile = profile
        self.work = work
        self.database: DevDatabase = start_dev_database(data_dir=work / "db", binary=HARNESS)
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {
            **os.environ,
            # This checkout's code and its generated contract (the installed client package may be another checkout's).
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python" / "src")]),
            "USERS_GRPC_ADDRESS": self.address,
            "USERS_MONGODB_URI": self.database.uri,
            "USERS_MONGODB_DATABASE": "bench",
            "USERS_KEY_ENCRYPTION_KEY": new_key_encryption_key(),
            "USERS_BCRYPT_ROUNDS": str(profile.bcrypt_rounds),
            "USERS_MAIL_DIR": str(work / "mail"),
            # One client machine sends everything: the per-source limit would refuse the load itself.
            "USERS_RATE_LIMIT_REQUESTS": "1000000",
            "USERS_DB_TIMEOUT_SECONDS": "30",
            "USERS_LOG_LEVEL": "WARNING",
            # One process unless asked (--workers): the figures above were measured so.
            "USERS_WORKERS": str(workers),
        }
        self.workers = workers
        self.server_log = (work / "server.log").open("w")
        self.server: subprocess.Popen[bytes] | None = None
        self.seed_seconds = 0.0
        self.protoset = work / "contracts.protoset"
        write_protoset(self.protoset)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = user_service_pb2_grpc.UserServiceStub(self.channel)

    def start_server(self, workers: int | None = None) -> None:
        if workers is not None:
            self.workers = workers
            self.env["USERS_WORKERS"] = str(workers)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "users_grpc", "serve"], env=self.env, stdout=self.server_log, stderr=self.server_log
        )

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    def restart_server(self, **settings: str) -> None:
        """The server again, on the same database and address, with these USERS_* settings changed."""
        self.stop_server()
        self.env.update(settings)
        self.start_server()
        self.wait_until_serving()

    def close(self) -> None:
        self.channel.close()
        self.stop_server()
        self.server_log.close()
        self.database.stop()

    def wait_until_serving(self, timeout: float = 120) -> None:
        health: Any = health_pb2_grpc.HealthStub(self.channel)  # the stubs declare no methods
        deadline = time.monotonic() + timeout
        assert self.server is not None
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"the server exited ({self.server.returncode}); see {self.work / 'server.log'}")
            if self.workers == 1:
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            elif self._every_worker_serving():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.1)

    def _every_worker_serving(self) -> bool:
        """All workers forked, and SERVING on 8 new connections per worker in a row: the kernel
        hands each to a worker at random, so one still starting would most likely answer one.
        A bench's wait, not a test's: a worker that missed them all shows as errors in the rows."""
        assert self.server is not None
        if len(process_tree(self.server.pid)) < self.workers + 1:
            return False
        for _ in range(8 * self.workers):
            with grpc.insecure_channel(self.address) as channel, contextlib.suppress(grpc.RpcError):
                health: Any = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    continue
            return False
        return True

    def usage(self) -> Usage:
        """CPU of the server (every worker too) and of the database."""
        assert self.server is not None
        server = sum(cpu_seconds(pid) for pid in process_tree(self.server.pid))
        return Usage(server=server, database=cpu_seconds(self.database.process.pid))

    def seed(self) -> list[str]:
        """An admin made as an operator would, then that many users copied from it, each with one
        audit event; their names. Run before the server starts, so its background work does not
        compete with the inserts."""
        subprocess.run(
            [sys.executable, "-m", "users_grpc", "create-admin", "--username", "admin", "--email", "admin@example.com"],
            env={**self.env, "USERS_ADMIN_PASSWORD": PASSWORD},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        client: MongoClient[dict[str, Any]] = MongoClient(self.database.uri, tz_aware=True)
        with client:
            users = client["bench"]["users"]
            admin = users.find_one({"username_key": identifier_key("admin")})
            assert admin is not None
            names = [f"user{n:06d}" for n in range(self.profile.users)]
            started = time.monotonic()
            seed_users(client["bench"], admin, names, audit_events=True, tenants=TENANTS)
            self.seed_seconds = time.monotonic() - started
        return names

    def sign_in(self, identifier: str) -> pb.AuthenticateResponse:
        reply: pb.AuthenticateResponse = self.stub.Authenticate(
            pb.AuthenticateRequest(identifier=identifier, password=PASSWORD), timeout=60
        )
        return reply

    def deep_page_token(self, admin_token: str) -> str:
        """The page token of page ``deep_page`` (pages of ``page_size``), reached in pages of up to 1,000."""
        metadata = (("authorization", f"Bearer {admin_token}"),)
        to_skip = (self.profile.deep_page - 1) * self.profile.page_size
        token = ""
        while to_skip:
            size = min(to_skip, 1000)
            reply = self.stub.ListUsers(
                pb.ListUsersRequest(page_size=size, page_token=token), metadata=metadata, timeout=120
            )
            token, to_skip = reply.next_page_token, to_skip - size
            assert token, "fewer users than the deep page needs"
        return token

    def ghz(
        self,
        method: str,
        data: Sequence[dict[str, Any]] | dict[str, Any],
        *,
        metadata: dict[str, str] | None = None,
        seconds: float | None = None,
        concurrency: int | None = None,
        rate: int | None = None,
        total: int | None = None,
    ) -> subprocess.Popen[str]:
        """Start ghz on ``method``; a list of data goes round, call by call."""
        name = uuid.uuid4().hex[:8]
        data_file = self.work / f"data-{name}.json"
        data_file.write_text(json.dumps(data))
        command = [
            str(GHZ),
            "--insecure",
            "--protoset",
            str(self.protoset),
            "--call",
            method,
            "--data-file",
            str(data_file),
            *(
                ["--total", str(total)]
                if total is not None
                # Calls still in flight when the time is up are left out rather than counted as failed.
                else ["--duration", f"{int((seconds or self.profile.seconds) * 1000)}ms", "--duration-stop", "ignore"]
            ),
            "--concurrency",
            str(concurrency or self.profile.concurrency),
            # One connection per call in flight, as wrk's side: ghz's default of one connection
            # would send every call to the one worker that accepted it (SO_REUSEPORT spreads
            # connections, not calls), so --workers could never show a gain.
            "--connections",
            str(concurrency or self.profile.concurrency),
            "--timeout",
            "60s",
            "--format",
            "json",
        ]
        if metadata is not None:
            metadata_file = self.work / f"metadata-{name}.json"
            metadata_file.write_text(json.dumps(metadata))
            command += ["--metadata-file", str(metadata_file)]
        if rate is not None:
            command += ["--rps", str(rate)]
        return subprocess.Popen([*command, self.address], stdout=subprocess.PIPE, text=True)  # noqa: S603 - ghz, with arguments built here

    def measure(self, name: str, method: str, data: Any, **options: Any) -> Row:
        before = self.usage()
        return self.row(name, self.ghz(method, data, **options), before)

    def row(self, name: str, run: subprocess.Popen[str], before: Usage) -> Row:
        output, _ = run.communicate()
        after = self.usage()
        if run.returncode != 0:
            raise RuntimeError(f"ghz failed for {name}: {output[:500]}")
        report = json.loads(output)
        statuses: dict[str, int] = report.get("statusCodeDistribution") or {}
        calls = sum(statuses.values()) or int(report["count"])
        latencies = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
        return Row(
            name=name,
            calls=calls,
            errors=calls - statuses.get("OK", 0),
            per_second=float(report["rps"]),
            p50_ms=latencies.get(50, float("nan")),
            p99_ms=latencies.get(99, float("nan")),
            server_us=(after.server - before.server) / max(calls, 1) * 1e6,
            database_us=(after.database - before.database) / max(calls, 1) * 1e6,
        )


def _extent(calls: int | None, seconds: float) -> str:
    return f"{seconds:g} s" if calls is None else f"{calls} calls"


def ratio(figure: float, baseline: float) -> float:
    return figure / baseline if baseline else float("nan")


def round_robin(values: Sequence[str]) -> str:
    """A ghz template (Go templates with sprig) that renders to value n mod len of call n."""
    # Go's raw strings (backquotes): the template is applied to JSON text, where double quotes are escaped.
    assert not any("`" in value for value in values)
    quoted = " ".join(f"`{value}`" for value in values)
    return f"{{{{ index (list {quoted}) (mod .RequestNumber {len(values)}) }}}}"


def write_protoset(path: Path) -> None:
    """The health and user service contracts as a descriptor set, for ghz, from the generated code."""
    seen: set[str] = set()
    files: list[descriptor_pb2.FileDescriptorProto] = []

    def add(file: Any) -> None:  # a FileDescriptor (upb's, to the type stubs, is another class)
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files.append(proto)

    add(health_pb2.DESCRIPTOR)
    add(pb.DESCRIPTOR)
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())


def bcrypt_seconds(rounds: int) -> float:
    """One bcrypt verification at ``rounds``, the median of three, in this process."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds))
    samples = []
    for _ in range(3):
        started = time.perf_counter()
        bcrypt.checkpw(PASSWORD.encode(), hashed)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


@contextlib.contextmanager
def running(profile: Profile, *, seeded: list[str] | None = None, workers: int = 1) -> Iterator[Bench]:
    """The database, seeded (the names go into ``seeded``) before the server starts, and the server."""
    with tempfile.TemporaryDirectory(prefix="users-bench-") as directory:
        bench = Bench(profile, Path(directory), workers=workers)
        try:
            if seeded is not None:
                seeded += bench.seed()
            bench.start_server()
            bench.wait_until_serving()
            yield bench
        finally:
            bench.close()


def run(profile: Profile, workers: int = 1) -> str:
    if not GHZ.exists():
        raise SystemExit(f"bench: {GHZ} is missing: run .ci/setup (or set USERS_BENCH_GHZ)")
    cores = os.cpu_count() or 1
    lines: list[str] = []
    names: list[str] = []
    with running(profile, seeded=names, workers=workers) as bench:
        seeded_in = bench.seed_seconds
        assert bench.server is not None
        # The database's CPU while the server only runs its background work (the mail sender's
        # and the change log's polls, housekeeping): what sweeping costs at this many users.
        idle_before = bench.usage()
        time.sleep(profile.idle_seconds)
        idle = bench.usage()
        idle_database_ms = (idle.database - idle_before.database) / profile.idle_seconds * 1000
        idle_server_ms = (idle.server - idle_before.server) / profile.idle_seconds * 1000
        spread = [names[(2 * k + 1) * len(names) // (2 * profile.token_users)] for k in range(profile.token_users)]
        signed_in = [bench.sign_in(name) for name in spread]
        admin = bench.sign_in("admin")
        # ghz takes one metadata object, rendered as a template per call: pick the n-th user's id and token alike.
        own_data = {"user_id": round_robin([reply.user.id for reply in signed_in])}
        own_metadata = {"authorization": "Bearer " + round_robin([reply.access_token for reply in signed_in])}
        admin_metadata = {"authorization": f"Bearer {admin.access_token}"}
        by_identifier = {"identifier": round_robin(spread)}
        # Ten users share the prefix (names are user000000, user000001, ...): a search by name.
        prefix = names[len(names) // 2][:-1]
        subject = signed_in[0].user.id  # each seeded user has one audit event
        # ghz takes bytes as base64 in its JSON.
        tenant_value = base64.b64encode(f"tenant-{TENANTS // 2:03d}".encode()).decode()
        tenant_filter = {"scope": "METADATA_SCOPE_ADMIN", "key": "tenant", "value": tenant_value}
        sign_ins = [{"identifier": name, "password": PASSWORD} for name in names[:: max(1, len(names) // 64)]]
        run_id = uuid.uuid4().hex[:6]
        new_user = {
            "username": f"new-{run_id}-{{{{.RequestNumber}}}}",
            "email": f"new-{run_id}-{{{{.RequestNumber}}}}@example.com",
            "first_name": "New",
            "last_name": "User",
            "password": PASSWORD,
            "password_confirmation": PASSWORD,
        }
        deep_error = ""
        try:
            deep_token: str | None = bench.deep_page_token(admin.access_token)
        except grpc.RpcError as error:  # each page's walk timed out: the row is left out, and says so
            deep_token, deep_error = None, error.code().name
        hash_seconds = bcrypt_seconds(profile.bcrypt_rounds)
        ceiling = cores / hash_seconds
        rss_start = resident_mb(bench.server.pid)
        # Warm-up: connections, the first signature check of each token, ghz's reflection.
        bench.measure("warm-up", f"{SERVICE}.GetUser", own_data, metadata=own_metadata, seconds=0.5)

        counted = {"total": profile.cheap_calls}
        health = bench.measure("health Check", "grpc.health.v1.Health.Check", {"service": ""}, **counted)
        cheap = [
            health,
            bench.measure("GetPublicKeys", f"{SERVICE}.GetPublicKeys", {}, **counted),
            bench.measure("GetUser (own token)", f"{SERVICE}.GetUser", own_data, metadata=own_metadata, **counted),
            # One at a time and a fixed count: on the embedded database each page scans the collection.
            bench.measure(
                "ListUsers page 1",
                f"{SERVICE}.ListUsers",
                {"page_size": profile.page_size},
                metadata=admin_metadata,
                concurrency=1,
                total=profile.list_calls,
            ),
            # The count of every user the page's total_size asks for (AIP-158: only when asked).
            bench.measure(
                "ListUsers page 1, total_size",
                f"{SERVICE}.ListUsers",
                {"page_size": profile.page_size, "include_total_size": True},
                metadata=admin_metadata,
                concurrency=1,
                total=profile.list_calls,
            ),
            bench.measure(
                "GetUserByIdentifier (admin)",
                f"{SERVICE}.GetUserByIdentifier",
                by_identifier,
                metadata=admin_metadata,
                **counted,
            ),
            bench.measure(
                "ListUsers filtered by prefix",
                f"{SERVICE}.ListUsers",
                {"page_size": profile.page_size, "prefix": prefix},
                metadata=admin_metadata,
                concurrency=1,
                total=profile.list_calls,
            ),
            # One user in TENANTS has this tenant: a page of them, by the metadata index, and their count.
            bench.measure(
                "ListUsers filtered by metadata",
                f"{SERVICE}.ListUsers",
                {"page_size": profile.page_size, "metadata": tenant_filter},
                metadata=admin_metadata,
                concurrency=1,
                total=profile.list_calls,
            ),
            bench.measure(
                "ListAuditEvents page 1",
                f"{SERVICE}.ListAuditEvents",
                {"page_size": profile.page_size},
                metadata=admin_metadata,
                concurrency=1,
                total=profile.list_calls,
            ),
            bench.measure(
                "ListAuditEvents of one user",
                f"{SERVICE}.ListAuditEvents",
                {"page_size": profile.page_size, "subject_id": subject},
                metadata=admin_metadata,
                concurrency=1,
                total=profile.list_calls,
            ),
        ]
        if deep_token is not None:
            cheap.insert(
                4,
                bench.measure(
                    f"ListUsers page {profile.deep_page:,}",
                    f"{SERVICE}.ListUsers",
                    {"page_size": profile.page_size, "page_token": deep_token},
                    metadata=admin_metadata,
                    concurrency=1,
                    total=profile.list_calls,
                ),
            )
        hashing = [
            bench.measure(
                "Authenticate",
                f"{SERVICE}.Authenticate",
                sign_ins,
                concurrency=profile.sign_in_concurrency,
                seconds=profile.seconds * 2,
                total=profile.sign_in_calls,
            ),
            bench.measure(
                "CreateUser",
                f"{SERVICE}.CreateUser",
                new_user,
                concurrency=profile.sign_in_concurrency,
                seconds=profile.seconds * 2,
                total=profile.sign_in_calls,
            ),
        ]
        fixed = {"metadata": own_metadata, "rate": profile.fixed_rate, "concurrency": 8, **counted}
        alone = bench.measure(f"GetUser at {profile.fixed_rate}/s, alone", f"{SERVICE}.GetUser", own_data, **fixed)
        before = bench.usage()
        busy = bench.ghz(
            f"{SERVICE}.Authenticate",
            sign_ins,
            concurrency=profile.sign_in_concurrency,
            seconds=profile.seconds + 2,
        )
        while_hashing = bench.measure(
            f"GetUser at {profile.fixed_rate}/s, while Authenticate hashes",
            f"{SERVICE}.GetUser",
            own_data,
            **fixed,
        )
        beside = bench.row("Authenticate, meanwhile", busy, before)

        mixed_seconds = profile.mixed_seconds
        mixed = [
            bench.ghz(f"{SERVICE}.GetUser", own_data, metadata=own_metadata, seconds=mixed_seconds, concurrency=8),
            bench.ghz("grpc.health.v1.Health.Check", {}, seconds=mixed_seconds, concurrency=4),
            bench.ghz(f"{SERVICE}.Authenticate", sign_ins, seconds=mixed_seconds, concurrency=2),
            bench.ghz(
                f"{SERVICE}.CreateUser",
                new_user
                | {
                    "username": f"mix-{run_id}-{{{{.RequestNumber}}}}",
                    "email": f"mix-{run_id}-{{{{.RequestNumber}}}}@example.com",
                },
                seconds=mixed_seconds,
                concurrency=2,
            ),
        ]
        mixed_calls = 0
        for process in mixed:
            output, _ = process.communicate()
            mixed_calls += int(json.loads(output)["count"]) if process.returncode == 0 else 0
        rss_end = resident_mb(bench.server.pid)

    def cheap_line(row: Row) -> str:
        return (
            f"| {row.name} | {row.per_second:,.0f} ({ratio(row.per_second, health.per_second):.2f}x) "
            f"| {row.p50_ms:.2f} | {row.p99_ms:.2f} "
            f"| {row.server_us:,.0f} ({ratio(row.server_us, health.server_us):.2f}x) | {row.database_us:,.0f} "
            f"| {row.calls:,} | {row.errors:,} |"
        )

    def hashing_line(row: Row) -> str:
        return (
            f"| {row.name} | {row.per_second:,.1f} ({ratio(row.per_second, ceiling):.2f}x ceiling) "
            f"| {row.p50_ms:.0f} | {row.p99_ms:.0f} "
            f"| {row.server_us:,.0f} | {row.database_us:,.0f} | {row.calls:,} | {row.errors:,} |"
        )

    first = cheap[3]
    deep = cheap[4] if deep_token is not None else None
    by_metadata = next(row for row in cheap if row.name == "ListUsers filtered by metadata")
    lines += [
        f"machine: {cores} cores, {cpu_model()}; Python {platform.python_version()}; {platform.platform()}",
        f"users seeded: {len(names):,} (in {seeded_in:.1f} s); bcrypt cost {profile.bcrypt_rounds}: "
        f"one verification {hash_seconds * 1000:.0f} ms, so the hashing ceiling is {cores} cores ÷ that "
        f"= {ceiling:.1f} sign-ins/s",
        f"each run {_extent(profile.cheap_calls, profile.seconds)} (sign-ins "
        f"{_extent(profile.sign_in_calls, profile.seconds * 2)}); cheap calls {profile.concurrency} "
        f"in flight, sign-ins {profile.sign_in_concurrency}; baseline in brackets",
        "",
        "| call | calls/s | p50 ms | p99 ms | server CPU µs/call | database CPU µs/call | calls | errors |",
        "|---|---|---|---|---|---|---|---|",
        *(cheap_line(row) for row in cheap),
        *(hashing_line(row) for row in [*hashing, beside]),
        "",
        # CPU per call means nothing here: the rate is fixed, and the hashing runs beside it.
        f"GetUser at a fixed {profile.fixed_rate} calls/s, 8 in flight: p50 {alone.p50_ms:.2f} ms, p99 "
        f"{alone.p99_ms:.2f} ms alone ({alone.errors} errors); p50 {while_hashing.p50_ms:.2f} ms, p99 "
        f"{while_hashing.p99_ms:.2f} ms while Authenticate keeps hashing busy ({while_hashing.errors} errors); "
        f"p99 ratio {ratio(while_hashing.p99_ms, alone.p99_ms):.2f}",
        f"ListUsers page {profile.deep_page:,} ÷ page 1, p50: {ratio(deep.p50_ms, first.p50_ms):.2f}"
        if deep is not None
        else f"ListUsers page {profile.deep_page:,}: not measured, the walk to it failed ({deep_error})",
        f"ListUsers filtered by metadata (tenant, 1 user in {TENANTS}) ÷ page 1, p50: "
        f"{ratio(by_metadata.p50_ms, first.p50_ms):.2f}",
        f"idle for {profile.idle_seconds:g} s after seeding (background work only): database CPU "
        f"{idle_database_ms:.1f} ms/s, server CPU {idle_server_ms:.1f} ms/s",
        f"server resident memory: {rss_start:.0f} MB at the start, {rss_end:.0f} MB after {mixed_seconds:g} s "
        f"of mixed load ({mixed_calls:,} calls: GetUser, health Check, Authenticate and CreateUser at once)",
    ]
    return "\n".join(lines)


def compare_workers(profile: Profile, counts: Sequence[int]) -> str:
    """The baseline, GetUser and ListUsers rows against one seeded database, served by each count of
    workers in turn (``users-grpc serve --workers N``; 1,2,1,2 interleaves them on a busy machine);
    each row's calls/s also ÷ the first run's."""
    if not GHZ.exists():
        raise SystemExit(f"bench: {GHZ} is missing: run .ci/setup (or set USERS_BENCH_GHZ)")
    runs: list[tuple[int, list[Row]]] = []
    with tempfile.TemporaryDirectory(prefix="users-bench-") as directory:
        bench = Bench(profile, Path(directory), workers=counts[0])
        try:
            names = bench.seed()
            for count in counts:
                bench.start_server(workers=count)
                bench.wait_until_serving()
                runs.append((count, _worker_rows(bench, names)))
                bench.stop_server()
        finally:
            bench.close()
    first = runs[0][1]
    lines = [
        f"machine: {os.cpu_count()} cores, {cpu_model()}; Python {platform.python_version()}; "
        f"load average before: {os.getloadavg()[0]:.1f}",
        f"users seeded: {len(names):,}; each cheap row {_extent(profile.cheap_calls, profile.seconds)}, "
        f"{profile.concurrency} in flight; ListUsers {profile.list_calls * 2} calls, 2 in flight",
        "",
        "| call | workers | calls/s (÷ health) | ÷ 1st run | p50 ms | p99 ms | server CPU µs/call | "
        "database CPU µs/call | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for count, rows in runs:
        health = rows[0]
        for row, baseline in zip(rows, first, strict=True):
            lines.append(
                f"| {row.name} | {count} | {row.per_second:,.1f} ({ratio(row.per_second, health.per_second):.2f}x) "
                f"| {ratio(row.per_second, baseline.per_second):.2f}x | {row.p50_ms:.2f} | {row.p99_ms:.2f} "
                f"| {row.server_us:,.0f} | {row.database_us:,.0f} | {row.errors:,} |"
            )
    return "\n".join(lines)


def _worker_rows(bench: Bench, names: list[str]) -> list[Row]:
    profile = bench.profile
    spread = [names[(2 * k + 1) * len(names) // (2 * profile.token_users)] for k in range(profile.token_users)]
    signed_in = [bench.sign_in(name) for name in spread]
    admin = bench.sign_in("admin")
    own_data = {"id": round_robin([reply.user.id for reply in signed_in])}
    own_metadata = {"authorization": "Bearer " + round_robin([reply.access_token for reply in signed_in])}
    admin_metadata = {"authorization": f"Bearer {admin.access_token}"}
    # Warm-up: connections to every worker, the first signature check of each token there.
    bench.measure("warm-up", f"{SERVICE}.GetUser", own_data, metadata=own_metadata, seconds=1)
    counted = {"total": profile.cheap_calls}
    return [
        bench.measure("health Check", "grpc.health.v1.Health.Check", {"service": ""}, **counted),
        bench.measure("GetUser (own token)", f"{SERVICE}.GetUser", own_data, metadata=own_metadata, **counted),
        bench.measure("GetUser (admin)", f"{SERVICE}.GetUser", own_data, metadata=admin_metadata, **counted),
        bench.measure(
            "ListUsers page 1",
            f"{SERVICE}.ListUsers",
            {"page_size": profile.page_size},
            metadata=admin_metadata,
            concurrency=2,  # two at once: one each, if two workers serve
            total=profile.list_calls * 2,
        ),
    ]


def compare_coalescing(profile: Profile) -> str:
    """GetUser with one's own token and an admin's GetUser of others, with USERS_COALESCE_READS on and
    off in turn (the server restarted on the same database each time), twice: one run, like with like."""
    names: list[str] = []
    rows: list[tuple[str, Row]] = []
    with running(profile, seeded=names) as bench:
        spread = [names[(2 * k + 1) * len(names) // (2 * profile.token_users)] for k in range(profile.token_users)]
        signed_in = [bench.sign_in(name) for name in spread]
        admin = bench.sign_in("admin")
        ids = round_robin([reply.user.id for reply in signed_in])
        own = {
            "data": {"id": ids},
            "metadata": {"authorization": "Bearer " + round_robin([r.access_token for r in signed_in])},
        }
        admins = {"data": {"id": ids}, "metadata": {"authorization": f"Bearer {admin.access_token}"}}
        for setting in ("true", "false", "true", "false"):
            bench.restart_server(USERS_COALESCE_READS=setting)
            # Warm-up: connections, the first signature check of each token.
            bench.measure("warm-up", f"{SERVICE}.GetUser", own["data"], metadata=own["metadata"], seconds=0.5)
            bench.measure("warm-up", f"{SERVICE}.GetUser", admins["data"], metadata=admins["metadata"], seconds=0.5)
            label = "on" if setting == "true" else "off"
            counted = {"total": profile.cheap_calls}
            rows += [
                (label, bench.measure("health Check", "grpc.health.v1.Health.Check", {"service": ""}, **counted)),
                (label, bench.measure("GetUser (own token)", f"{SERVICE}.GetUser", **own, **counted)),
                (label, bench.measure("GetUser (admin)", f"{SERVICE}.GetUser", **admins, **counted)),
            ]
    lines = [
        f"machine: {os.cpu_count()} cores, {cpu_model()}; Python {platform.python_version()}",
        f"users seeded: {len(names):,}; each run {_extent(profile.cheap_calls, profile.seconds)}, "
        f"{profile.concurrency} in flight; USERS_COALESCE_READS on, off, on, off (a server each)",
        "",
        "| coalescing | call | calls/s | p50 ms | p99 ms | server CPU µs/call | database CPU µs/call "
        "| calls | errors |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {row.name} | {row.per_second:,.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} "
            f"| {row.server_us:,.0f} | {row.database_us:,.0f} | {row.calls:,} | {row.errors:,} |"
            for label, row in rows
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds, tiny sizes: checks the harness runs")
    parser.add_argument("--five-minutes", action="store_true", help="5 minutes of mixed load before reading memory")
    parser.add_argument("--users", type=int, help="users to seed (default 12,000)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s a cheap row and 10 s of mixed load: for several runs on a busy machine",
    )
    parser.add_argument("--list-calls", type=int, help="calls of each ListUsers and ListAuditEvents row (default 3)")
    parser.add_argument(
        "--workers",
        help="the server's workers (USERS_WORKERS; default 1); several, as 1,2,1,2: only the baseline, GetUser "
        "and ListUsers rows, for each count in turn on one seeded database, with ratios to the first run",
    )
    parser.add_argument(
        "--coalescing",
        action="store_true",
        help="only GetUser (own token, and an admin's) with USERS_COALESCE_READS on and off, interleaved, twice",
    )
    parser.add_argument("--peer", choices=["keycloak"], help="side by side with Keycloak (bench/peer_keycloak.py)")
    parser.add_argument("--peer-seconds", type=int, default=10, help="with --peer: each row's run a side")
    parser.add_argument("--peer-warm-up", type=int, default=5, help="with --peer: each row's uncounted warm-up")
    args = parser.parse_args(argv)
    if args.peer:
        from bench.peer_keycloak import run_peer  # it imports this module: here, not at the top

        workers = int(args.workers) if args.workers else 1
        print(run_peer(args.users or 1000, args.peer_seconds, args.peer_warm_up, workers), flush=True)
        return
    profile = SMOKE if args.smoke else FULL
    if args.quick:
        profile = dataclasses.replace(profile, seconds=3, mixed_seconds=10, sign_in_calls=16)
    if args.list_calls:
        profile = dataclasses.replace(profile, list_calls=args.list_calls)
    if args.five_minutes:
        profile = dataclasses.replace(profile, mixed_seconds=300)
    if args.users:
        # The deep page must exist: with fewer users it is the last full page.
        deep_page = min(profile.deep_page, args.users // profile.page_size - 1)
        profile = dataclasses.replace(profile, users=args.users, deep_page=max(deep_page, 1))
    if args.coalescing:
        print(compare_coalescing(profile), flush=True)
        return
    counts = [int(count) for count in args.workers.split(",")] if args.workers else [1]
    if len(counts) > 1:
        print(compare_workers(profile, counts), flush=True)
    else:
        print(run(profile, workers=counts[0]), flush=True)


if __name__ == "__main__":
    main()
