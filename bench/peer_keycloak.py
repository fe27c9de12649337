"""Side by side with Keycloak: ``python -m bench --peer keycloak`` (optional, not in CI).

Fetches Keycloak's distribution with Maven into .bench-cache/ (gitignored), runs ``kc.sh
start-dev`` (its embedded H2 database, in the same JVM) on the Java 25 JDK beside our server on
the embedded database, seeds the same users on both sides, and runs each row on both, interleaved
(ours, theirs, next row), twice, after a warm-up round that is not counted. ghz drives ours, wrk
(Debian's package) drives Keycloak: wrk's Lua hook lets each request carry another token, user or
form body, as ghz's templates do; both with the same calls in flight. CPU per call is user+system
time from /proc: our server plus our database process; Keycloak's one JVM (H2 runs inside it).

    .venv/bin/python -m bench --peer keycloak               # 1,000 users; 14 minutes on a busy machine
    .venv/bin/python -m bench --peer keycloak --users 200 --peer-seconds 2   # a quick look

USERS_BENCH_JAVA_HOME names another JDK (default Temurin 25), USERS_BENCH_WRK another wrk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench.__main__ import (
    FULL,
    GHZ,
    PASSWORD,
    ROOT,
    SERVICE,
    Bench,
    bcrypt_seconds,
    cpu_seconds,
    free_port,
    resident_mb,
    round_robin,
)

VERSION = "26.5.6"
ARTIFACT = f"org.keycloak:keycloak-quarkus-dist:{VERSION}:zip"
CACHE = ROOT / ".bench-cache" / "keycloak"
JAVA_HOME = Path(os.environ.get("USERS_BENCH_JAVA_HOME", "/usr/lib/jvm/temurin-25-jdk-amd64"))
WRK = os.environ.get("USERS_BENCH_WRK", "wrk")
REALM = "bench"
CLIENT = "bench"  # a public client allowed the password grant
ADMIN = "admin"
CHEAP_IN_FLIGHT = 32
PAGE_IN_FLIGHT = 8
SIGN_IN_IN_FLIGHT = 8
TOKEN_USERS = 16  # users signed in for the own-token row, each calling with their own token
READ_USERS = 100  # users the admin reads, in turn
SIGN_IN_USERS = 64  # accounts of the "many accounts" sign-in row


@dataclass(frozen=True)
class Result:
    """One side's run of one row."""

    calls: int
    errors: int
    per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # per call, every process of the side
    database_us: float | None = None  # the part of cpu_us that was our database process (ours only)


@dataclass
class Pair:
    """One row, both sides, a result per round."""

    name: str
    ours: list[Result] = field(default_factory=list)
    theirs: list[Result] = field(default_factory=list)


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""


@dataclass(frozen=True)
class Row:
    """One row of the table: what each side calls, how many in flight."""

    name: str
    method: str  # ours, a gRPC method
    data: Any
    metadata: dict[str, str] | None
    calls: list[HttpCall]  # theirs, in turn
    in_flight: int


# --- pure parts (tests/unit/test_peer_bench.py) ---------------------------------------------


def _lua(text: str) -> str:
    # JSON's escapes of ASCII text (\" \\ \n) are Lua's too; \uXXXX is not, hence ASCII only.
    if not text.isascii():
        raise ValueError(f"not ASCII, which this script cannot quote for Lua: {text!r}")
    return json.dumps(text)


def wrk_script(calls: Sequence[HttpCall]) -> str:
    """A wrk script: call n of each thread is calls[n mod len], and done() prints one JSON line."""
    rows = []
    for call in calls:
        headers = ", ".join(f"[{_lua(name)}] = {_lua(value)}" for name, value in call.headers)
        body = _lua(call.body) if call.body else "nil"
        rows.append(f"  {{{_lua(call.method)}, {_lua(call.path)}, {{{headers}}}, {body}}},")
    return "\n".join(
        [
            "local calls = {",
            *rows,
            "}",
            "local requests = {}",
            "local n = 0",
            # In init, not at the top: wrk sets the Host header just before it calls init.
            "init = function(args)",
            "  for i, c in ipairs(calls) do requests[i] = wrk.format(c[1], c[2], c[3], c[4]) end",
            "end",
            "request = function()",
            "  n = n + 1",
            "  return requests[(n % #requests) + 1]",
            "end",
            "done = function(summary, latency, _)",
            "  local e = summary.errors",
            '  io.write(string.format(\'{"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, \'',
            '    .. \'"p50_us": %d, "p99_us": %d}\\n\',',
            "    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,",
            "    latency:percentile(50), latency:percentile(99)))",
            "end",
            "",
        ]
    )


def parse_wrk(output: str, cpu_seconds_used: float) -> Result:
    """The JSON line wrk_script's done() printed (wrk's own report comes before it)."""
    line = next(line for line in reversed(output.splitlines()) if line.startswith("{"))
    report = json.loads(line)
    calls = int(report["requests"])
    return Result(
        calls=calls,
        errors=int(report["errors"]) + int(report["non_2xx"]),
        per_second=calls / (report["duration_us"] / 1e6) if report["duration_us"] else 0.0,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        cpu_us=cpu_seconds_used / max(calls, 1) * 1e6,
    )


def _mean(results: Sequence[Result], figure: Callable[[Result], float]) -> float:
    return statistics.fmean(figure(result) for result in results) if results else float("nan")


def _figure(value: float) -> str:
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


def table(pairs: Sequence[Pair]) -> list[str]:
    """The side-by-side table: means over the rounds, and ours ÷ theirs of each round."""
    lines = [
        "| row | ours calls/s | theirs calls/s | ours ÷ theirs (each round) | p50 ms ours / theirs "
        "| p99 ms ours / theirs | CPU µs/call ours (server + database) | theirs | errors ours / theirs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        ours_rate, theirs_rate = _mean(pair.ours, lambda r: r.per_second), _mean(pair.theirs, lambda r: r.per_second)
        rounds = ", ".join(
            f"{_ratio(o.per_second, t.per_second):.2f}" for o, t in zip(pair.ours, pair.theirs, strict=True)
        )
        ours_cpu, database = _mean(pair.ours, lambda r: r.cpu_us), _mean(pair.ours, lambda r: r.database_us or 0.0)
        lines.append(
            f"| {pair.name} | {_figure(ours_rate)} | {_figure(theirs_rate)} "
            f"| {_ratio(ours_rate, theirs_rate):.2f} ({rounds}) "
            f"| {_mean(pair.ours, lambda r: r.p50_ms):.1f} / {_mean(pair.theirs, lambda r: r.p50_ms):.1f} "
            f"| {_mean(pair.ours, lambda r: r.p99_ms):.1f} / {_mean(pair.theirs, lambda r: r.p99_ms):.1f} "
            f"| {ours_cpu:,.0f} ({ours_cpu - database:,.0f} + {database:,.0f}) "
            f"| {_mean(pair.theirs, lambda r: r.cpu_us):,.0f} "
            f"| {sum(r.errors for r in pair.ours)} / {sum(r.errors for r in pair.theirs)} |"
        )
    return lines


# --- Keycloak -------------------------------------------------------------------------------


def keycloak_home() -> Path:
    """The unpacked distribution, fetched with Maven (into ~/.m2 and .bench-cache/) the first time."""
    archive = CACHE / f"keycloak-quarkus-dist-{VERSION}.zip"
    home = CACHE / "dist" / f"keycloak-{VERSION}"
    if not archive.exists():
        mvn = shutil.which("mvn") or "mvn"
        subprocess.run(  # noqa: S603 - Maven, with arguments built here
            [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={ARTIFACT}", f"-DoutputDirectory={CACHE}"],
            check=True,
        )
    if not home.exists():
        shutil.unpack_archive(archive, CACHE / "dist")
        (home / "bin" / "kc.sh").chmod(0o755)
    return home


def http(method: str, url: str, *, token: str = "", body: Any = None, form: dict[str, str] | None = None) -> Any:
    """One request for the set-up; the reply's JSON, or None if it has none."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if form is not None:
        data, headers["Content-Type"] = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=600) as reply:  # noqa: S310 - loopback
        text = reply.read()
    return json.loads(text) if text else None


def password_form(username: str) -> dict[str, str]:
    return {
        "grant_type": "password",
        "client_id": CLIENT,
        "username": username,
        "password": PASSWORD,
        "scope": "openid",  # userinfo answers only a token with it
    }


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children] + [d for child in children for d in descendants(int(child))]


class Keycloak:
    def __init__(self, work: Path) -> None:
        self.home = keycloak_home()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (work / "keycloak.log").open("w")
        # A fresh embedded database each run (dev mode keeps it in data/h2 of the distribution).
        shutil.rmtree(self.home / "data", ignore_errors=True)
        env = {
            **os.environ,
            "JAVA_HOME": str(JAVA_HOME),
            "KC_BOOTSTRAP_ADMIN_USERNAME": ADMIN,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": PASSWORD,
        }
        command = [
            str(self.home / "bin" / "kc.sh"),
            "start-dev",
            f"--http-port={self.port}",
            f"--http-management-port={free_port()}",
            "--http-host=127.0.0.1",
        ]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)  # noqa: S603 - kc.sh
        self.admin_token = ""
        try:
            self.ready_seconds = self._wait_until_ready()
        except BaseException:
            self.close()  # the caller never gets this object to close
            raise

    def _wait_until_ready(self, timeout: float = 600) -> float:
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Keycloak exited ({self.process.returncode}); see {self.log.name}")
            with contextlib.suppress(OSError):
                http("GET", f"{self.url}/realms/master")
                return time.monotonic() - self.started
            if time.monotonic() - self.started > timeout:
                raise RuntimeError("Keycloak did not become ready")
            time.sleep(0.1)

    def java_pid(self) -> int:
        """kc.sh runs java as its child, or becomes java (exec) after a re-augmentation."""
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "java":
                    return pid
        raise RuntimeError("no java process under kc.sh")

    def cpu(self) -> float:
        return cpu_seconds(self.java_pid())

    def set_up(self, names: Sequence[str], with_password: set[str]) -> None:
        """The realm with its client, the users (by partial import, 500 a request), tokens that
        outlive the run (the master realm's default is 60 s). Only the users who sign in get a
        password: the import hashes each (argon2), about 0.1 to 0.5 s apiece on this machine."""
        master = f"{self.url}/realms/master/protocol/openid-connect/token"
        form = {"grant_type": "password", "client_id": "admin-cli", "username": ADMIN, "password": PASSWORD}
        self.admin_token = http("POST", master, form=form)["access_token"]
        http("PUT", f"{self.url}/admin/realms/master", token=self.admin_token, body={"accessTokenLifespan": 7200})
        self.admin_token = http("POST", master, form=form)["access_token"]
        realm = {
            "realm": REALM,
            "enabled": True,
            "accessTokenLifespan": 7200,
            "clients": [{"clientId": CLIENT, "publicClient": True, "directAccessGrantsEnabled": True}],
        }
        http("POST", f"{self.url}/admin/realms", token=self.admin_token, body=realm)
        for first in range(0, len(names), 500):
            users = [
                {
                    "username": name,
                    "email": f"{name}@example.com",
                    "emailVerified": True,
                    "firstName": "Bench",
                    "lastName": name,
                    "enabled": True,
                }
                | (
                    {"credentials": [{"type": "password", "value": PASSWORD, "temporary": False}]}
                    if name in with_password
                    else {}
                )
                for name in names[first : first + 500]
            ]
            http(
                "POST",
                f"{self.url}/admin/realms/{REALM}/partialImport",
                token=self.admin_token,
                body={"ifResourceExists": "FAIL", "users": users},
            )

    def user_ids(self, names: Sequence[str]) -> list[str]:
        ids = []
        for name in names:
            query = urllib.parse.urlencode({"username": name, "exact": "true"})
            ids.append(http("GET", f"{self.url}/admin/realms/{REALM}/users?{query}", token=self.admin_token)[0]["id"])
        return ids

    def sign_in(self, username: str) -> str:
        token_url = f"{self.url}/realms/{REALM}/protocol/openid-connect/token"
        token: str = http("POST", token_url, form=password_form(username))["access_token"]
        return token

    def load(self, calls: Sequence[HttpCall], seconds: int, in_flight: int, work: Path) -> Result:
        script = work / f"wrk-{uuid.uuid4().hex[:8]}.lua"
        script.write_text(wrk_script(calls))
        before = self.cpu()
        command = [WRK, f"--threads={min(2, in_flight)}", f"--connections={in_flight}", f"--duration={seconds}s"]
        run = subprocess.run(  # noqa: S603 - wrk, with arguments built here
            [*command, "--timeout=60s", f"--script={script}", self.url],
            capture_output=True,
            text=True,
            check=True,
        )
        return parse_wrk(run.stdout, self.cpu() - before)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # kc.sh forwards it to java
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                self.process.kill()
                self.process.wait()
        self.log.close()


# --- ours -----------------------------------------------------------------------------------


def ours(bench: Bench, row: Row, seconds: float) -> Result:
    measured = bench.measure(
        row.name, row.method, row.data, metadata=row.metadata, seconds=seconds, concurrency=row.in_flight
    )
    return Result(
        calls=measured.calls,
        errors=measured.errors,
        per_second=measured.per_second,
        p50_ms=measured.p50_ms,
        p99_ms=measured.p99_ms,
        cpu_us=measured.server_us + measured.database_us,
        database_us=measured.database_us,
    )


def our_ids(bench: Bench, names: Sequence[str]) -> list[str]:
    client: MongoClient[dict[str, Any]] = MongoClient(bench.database.uri)
    with client:
        found = client["bench"]["users"].find({"username": {"$in": list(names)}}, {"_id": 1})
        return [str(document["_id"]) for document in found]


@contextlib.contextmanager
def both_sides(
    users: int, work: Path, workers: int = 1
) -> Iterator[tuple[Bench, Keycloak, list[str], dict[str, float]]]:
    """Our database and server, seeded; then Keycloak, seeded alike. Ours is started first and
    left idle while Keycloak starts and seeds."""
    startup: dict[str, float] = {}
    started = time.monotonic()
    bench = Bench(dataclasses.replace(FULL, users=users), work, workers=workers)  # starts our database
    startup["database"] = time.monotonic() - started
    keycloak: Keycloak | None = None
    try:
        names = bench.seed()
        started = time.monotonic()
        bench.start_server()
        bench.wait_until_serving()
        startup["server"] = time.monotonic() - started
        keycloak = Keycloak(work)
        startup["keycloak"] = keycloak.ready_seconds
        started = time.monotonic()
        keycloak.set_up(names, Accounts.of(names).signing_in())
        startup["keycloak seeding"] = time.monotonic() - started
        yield bench, keycloak, names, startup
    finally:
        if keycloak is not None:
            keycloak.close()
        bench.close()


@dataclass(frozen=True)
class Accounts:
    """Who does what, the same users on both sides."""

    token: list[str]  # sign in, then read themselves
    read: list[str]  # read by the admin
    sign_in: list[str]  # the "many accounts" sign-ins; the one account is sign_in[0]

    @classmethod
    def of(cls, names: Sequence[str]) -> Accounts:
        step = max(1, len(names) // TOKEN_USERS)
        return cls(
            token=list(names[step // 2 :: step])[:TOKEN_USERS],
            read=list(names[:: max(1, len(names) // READ_USERS)])[:READ_USERS],
            sign_in=list(names[:: max(1, len(names) // SIGN_IN_USERS)])[:SIGN_IN_USERS],
        )

    def signing_in(self) -> set[str]:
        return {*self.token, *self.sign_in}


def rows(bench: Bench, keycloak: Keycloak, names: Sequence[str]) -> list[Row]:
    accounts = Accounts.of(names)
    token_names, read_names, sign_in_names = accounts.token, accounts.read, accounts.sign_in
    signed_in = [bench.sign_in(name) for name in token_names]
    our_admin = {"authorization": f"Bearer {bench.sign_in('admin').access_token}"}
    own = {"authorization": "Bearer " + round_robin([reply.access_token for reply in signed_in])}
    their_tokens = [keycloak.sign_in(name) for name in token_names]
    their_admin = (("Authorization", f"Bearer {keycloak.admin_token}"),)
    prefix = names[0][:-2]  # user0000: 100 users, a full page
    users_url = f"/admin/realms/{REALM}/users"
    token_url = f"/realms/{REALM}/protocol/openid-connect/token"
    form = (("Content-Type", "application/x-www-form-urlencoded"),)

    def sign_ins(accounts: Sequence[str]) -> list[HttpCall]:
        return [HttpCall("POST", token_url, form, urllib.parse.urlencode(password_form(name))) for name in accounts]

    return [
        Row(
            "baseline (health Check vs GET /realms/R)",
            "grpc.health.v1.Health.Check",
            {"service": ""},
            None,
            [HttpCall("GET", f"/realms/{REALM}")],
            CHEAP_IN_FLIGHT,
        ),
        Row(
            "own user, own token (GetUser vs userinfo)",
            f"{SERVICE}.GetUser",
            {"id": round_robin([reply.user.id for reply in signed_in])},
            own,
            [
                HttpCall(
                    "GET", f"/realms/{REALM}/protocol/openid-connect/userinfo", (("Authorization", f"Bearer {t}"),)
                )
                for t in their_tokens
            ],
            CHEAP_IN_FLIGHT,
        ),
        Row(
            "admin reads a user (GetUser vs GET users/{id})",
            f"{SERVICE}.GetUser",
            {"id": round_robin(our_ids(bench, read_names))},
            our_admin,
            [HttpCall("GET", f"{users_url}/{id_}", their_admin) for id_ in keycloak.user_ids(read_names)],
            CHEAP_IN_FLIGHT,
        ),
        Row(
            "a page of 100 users (ListUsers vs GET users?max=100)",
            f"{SERVICE}.ListUsers",
            {"page_size": 100},
            our_admin,
            [HttpCall("GET", f"{users_url}?max=100", their_admin)],
            PAGE_IN_FLIGHT,
        ),
        Row(
            f"a page of 100 by prefix {prefix!r} (ListUsers prefix vs users?search=)",
            f"{SERVICE}.ListUsers",
            {"page_size": 100, "prefix": prefix},
            our_admin,
            [HttpCall("GET", f"{users_url}?max=100&search={prefix}", their_admin)],
            PAGE_IN_FLIGHT,
        ),
        Row(
            "sign-in, one account (Authenticate vs password grant)",
            f"{SERVICE}.Authenticate",
            {"identifier": sign_in_names[0], "password": PASSWORD},
            None,
            sign_ins(sign_in_names[:1]),
            SIGN_IN_IN_FLIGHT,
        ),
        Row(
            f"sign-in, {len(sign_in_names)} accounts in turn",
            f"{SERVICE}.Authenticate",
            [{"identifier": name, "password": PASSWORD} for name in sign_in_names],
            None,
            sign_ins(sign_in_names),
            SIGN_IN_IN_FLIGHT,
        ),
    ]


def run_row(bench: Bench, keycloak: Keycloak, row: Row, seconds: int, work: Path) -> tuple[Result, Result]:
    mine = ours(bench, row, seconds)
    theirs = keycloak.load(row.calls, seconds, row.in_flight, work)
    return mine, theirs


def run_peer(users: int, seconds: int, warm_up: int, workers: int = 1) -> str:
    if not GHZ.exists():
        raise SystemExit(f"bench: {GHZ} is missing: run .ci/setup (or set USERS_BENCH_GHZ)")
    if shutil.which(WRK) is None:
        raise SystemExit(f"bench: {WRK} is missing: apt-get install wrk (or set USERS_BENCH_WRK)")
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with (
        tempfile.TemporaryDirectory(prefix="users-peer-") as directory,
        both_sides(users, Path(directory), workers) as (
            bench,
            keycloak,
            names,
            startup,
        ),
    ):
        work = Path(directory)
        table_rows = rows(bench, keycloak, names)
        print(f"warm-up: each row {warm_up:g} s on each side", file=sys.stderr, flush=True)
        for row in table_rows:
            mine, theirs = run_row(bench, keycloak, row, warm_up, work)
            print(f"warm-up: {row.name}: ours {mine}, theirs {theirs}", file=sys.stderr, flush=True)
        pairs = [Pair(row.name) for row in table_rows]
        for round_ in (1, 2):
            for row, pair in zip(table_rows, pairs, strict=True):
                mine, theirs = run_row(bench, keycloak, row, seconds, work)
                print(f"round {round_}: {row.name}: ours {mine}, theirs {theirs}", file=sys.stderr, flush=True)
                pair.ours.append(mine)
                pair.theirs.append(theirs)
        assert bench.server is not None
        memory = {
            "ours": resident_mb(bench.server.pid),
            "our database": resident_mb(bench.database.process.pid),
            "theirs": resident_mb(keycloak.java_pid()),
        }
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    hash_seconds = bcrypt_seconds(FULL.bcrypt_rounds)
    ceiling = (os.cpu_count() or 1) / hash_seconds
    sign_in_rates = ", ".join(
        f"{pair.name.split(' (')[0]} {_mean(pair.ours, lambda r: r.per_second) / ceiling:.2f}x"
        for pair in pairs
        if pair.name.startswith("sign-in")
    )
    return "\n".join(
        [
            f"Keycloak {VERSION} (start-dev, embedded H2, {JAVA_HOME.name}) beside users-grpc (embedded database)",
            f"users on each side: {len(names):,}; our server: {workers} worker(s); "
            f"load average before {load_before}, after {load_after}",
            f"each row {seconds:g} s a side, ours then theirs, two rounds after a {warm_up:g} s warm-up round; "
            f"in flight: cheap rows {CHEAP_IN_FLIGHT}, pages {PAGE_IN_FLIGHT}, sign-ins {SIGN_IN_IN_FLIGHT}",
            "",
            *table(pairs),
            "",
            f"our sign-ins against our hashing ceiling (2 cores ÷ one bcrypt {FULL.bcrypt_rounds} "
            f"verification, {hash_seconds * 1000:.0f} ms = {ceiling:.1f}/s): {sign_in_rates}",
            f"resident memory after the runs: ours {memory['ours']:.0f} MB + database {memory['our database']:.0f} MB, "
            f"Keycloak {memory['theirs']:.0f} MB",
            f"ready after launch: our database {startup['database']:.1f} s, our server {startup['server']:.1f} s; "
            f"Keycloak {startup['keycloak']:.1f} s (seeding its users took {startup['keycloak seeding']:.1f} s)",
        ]
    )
