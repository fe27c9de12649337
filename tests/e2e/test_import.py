"""ImportUsers through a real channel and database, with bcrypt hashes made by Go's
golang.org/x/crypto/bcrypt (tests/tools/bcrypthash), not by the Python package the server uses."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.support.builds import BUILD_TIMEOUT, built_once
from tests.support.calls import error_info, raw_collection, reset_token, rpc_error, stored_users, violated_fields
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.config import MIN_BCRYPT_ROUNDS

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bcrypthash"
# 200 users, costs 4 to 10 (the test server's own cost, the most an import takes), few at the
# costly end (the test machine has two cores).
COSTS = [4] * 120 + [5] * 20 + [6] * 15 + [7] * 10 + [8] * 10 + [9] * 10 + [10] * 15
PREFIXES = ("$2a$", "$2b$", "$2y$")


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    """This module's servers hash at the production floor (10), not the suite's 4: imports take
    costs up to the server's own, and a cheaper import than that costs a sign-in extra work."""
    return start_server(bcrypt_rounds=MIN_BCRYPT_ROUNDS)


def build_bcrypthash(directory: Path) -> None:
    go = shutil.which("go")
    assert go, "Go is needed to build tests/tools/bcrypthash (as for dbharness)"
    subprocess.run([go, "build", "-o", str(directory / "bcrypthash"), "."], cwd=TOOL, check=True, timeout=300)


@pytest.fixture(scope="session")
def bcrypthash(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_once(tmp_path_factory, "bcrypthash", build_bcrypthash) / "bcrypthash"


def go_hashes(tool: Path, items: list[tuple[int, str]]) -> list[str]:
    """Go's $2a$ hashes of these (cost, password) pairs."""
    lines = "".join(f"{cost} {password}\n" for cost, password in items)
    done = subprocess.run([str(tool)], input=lines, capture_output=True, text=True, check=True, timeout=600)
    hashes = done.stdout.split()
    assert len(hashes) == len(items)
    return hashes


def relabelled(go_hash: str, prefix: str) -> str:
    # $2a$, $2b$ and $2y$ name one algorithm for passwords this short: PHP writes $2y$, OpenBSD $2b$.
    assert go_hash.startswith("$2a$")
    return prefix + go_hash[4:]


def imported(name: str, **changes: object) -> pb.ImportedUser:
    fields: dict[str, object] = {
        "username": name,
        "first_name": "Imported",
        "last_name": name.capitalize(),
        "email": f"{name}@example.com",
        "gender": user_pb2.GENDER_OTHER,
        "email_verified": True,
    }
    fields.update(changes)
    return pb.ImportedUser(**fields)  # type: ignore[arg-type]


def status_of(result: pb.ImportUserResult) -> grpc.StatusCode:
    assert result.WhichOneof("result") == "error"
    return next(code for code in grpc.StatusCode if code.value[0] == result.error.code)


def item_fields(result: pb.ImportUserResult) -> set[str]:
    """The fields of the item error's BadRequest detail, read as a client reads any status."""
    fields: set[str] = set()
    for detail in result.error.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.update(v.field for v in bad_request.field_violations)
    return fields


def item_reason(result: pb.ImportUserResult) -> tuple[str, dict[str, str]]:
    for detail in result.error.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    raise AssertionError("no ErrorInfo detail")


def verify(server: RunningServer, identifier: str, password: str) -> grpc.StatusCode:
    try:
        server.stub.VerifyCredentials(pb.VerifyCredentialsRequest(identifier=identifier, password=password))
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


@pytest.fixture
def batch(bcrypthash: Path) -> tuple[pb.ImportUsersRequest, list[str]]:
    passwords = [f"old system pässword {n:03d} ✓" for n in range(len(COSTS))]
    hashes = go_hashes(bcrypthash, list(zip(COSTS, passwords, strict=True)))
    users = [
        imported(f"migrant{n:03d}", password_hash=relabelled(go_hash, PREFIXES[n % 3]))
        for n, go_hash in enumerate(hashes)
    ]
    return pb.ImportUsersRequest(users=users), passwords


# 200 sign-ins, each one or two bcrypt checks and a rehash: minutes on a busy two-core machine.
@pytest.mark.timeout(600)
def test_imported_users_sign_in_with_their_old_passwords_and_get_our_scheme(
    server: RunningServer, batch: tuple[pb.ImportUsersRequest, list[str]]
) -> None:
    request, passwords = batch
    response = server.stub.ImportUsers(request, timeout=120)
    assert [r.WhichOneof("result") for r in response.results] == ["user"] * len(passwords)
    assert all(r.user.is_active for r in response.results)
    names = [item.username for item in request.users]
    before = {d["username"]: d for d in stored_users(server.settings.mongodb_uri, server.settings.mongodb_database)}
    assert all(before[name]["password_scheme"] == "bcrypt" for name in names)
    assert {before[name]["password_hash"][:4] for name in names} == set(PREFIXES)

    # Every one of them signs in with the original password (two at a time: two hashing threads),
    # bounded below the test's own time limit.
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda pair: verify(server, *pair), zip(names, passwords, strict=True), timeout=540))
    assert codes == [grpc.StatusCode.OK] * len(names)

    after = {d["username"]: d for d in stored_users(server.settings.mongodb_uri, server.settings.mongodb_database)}
    for name in names:
        document = after[name]
        assert "password_scheme" not in document, name
        assert document["password_hash"] != before[name]["password_hash"]
        assert document["password_hash"].startswith(f"$2b${server.settings.bcrypt_rounds:02d}$")
    # Under our scheme now: the right password still works, a wrong one does not.
    for name, password in list(zip(names, passwords, strict=True))[::40]:
        assert verify(server, name, password) == grpc.StatusCode.OK
        assert verify(server, name, password + "!") == grpc.StatusCode.UNAUTHENTICATED

    # A retried batch creates nobody twice.
    again = server.stub.ImportUsers(request, timeout=120)
    assert {status_of(r) for r in again.results} == {grpc.StatusCode.ALREADY_EXISTS}
    assert item_reason(again.results[0]) == ("ALREADY_EXISTS", {"field": "username"})
    stored = stored_users(server.settings.mongodb_uri, server.settings.mongodb_database)
    assert len(stored) == len(names) + 1  # and the admin


@BUILD_TIMEOUT  # may build, or wait for, the shared bcrypthash
def test_bad_items_fail_alone(
    server: RunningServer, bcrypthash: Path, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    (good_hash,) = go_hashes(bcrypthash, [(4, "a password of the old days")])
    cost_31 = "$2b$31$" + good_hash[7:]
    request = pb.ImportUsersRequest(
        users=[
            imported("good", password_hash=good_hash),
            imported("xprefix", password_hash="$2x$" + good_hash[4:]),
            imported("truncated", password_hash=good_hash[:-1]),
            imported("argon", password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"),
            imported("toocostly", password_hash=cost_31),
            imported("bademail", email="not an address"),
            imported("badgender", gender=99),
            imported("good", email="other@example.com"),  # the username of item 0
            imported("Good2", email="GOOD@example.com"),  # the email of item 0, in another case
            imported("anadmin", role=user_pb2.ROLE_ADMIN),
        ]
    )
    results = server.stub.ImportUsers(request).results
    assert results[0].user.username == "good"
    for index in (1, 2, 3, 4):
        assert status_of(results[index]) == grpc.StatusCode.INVALID_ARGUMENT
        assert item_fields(results[index]) == {f"users[{index}].password_hash"}
        assert item_reason(results[index])[0] == "INVALID_ARGUMENT"
    assert item_fields(results[5]) == {"users[5].email"}
    assert item_fields(results[6]) == {"users[6].gender"}
    assert status_of(results[7]) == grpc.StatusCode.ALREADY_EXISTS
    assert item_reason(results[7])[1] == {"field": "username"}
    assert status_of(results[8]) == grpc.StatusCode.ALREADY_EXISTS
    assert item_reason(results[8])[1] == {"field": "email"}
    assert results[9].user.role == user_pb2.ROLE_ADMIN
    assert verify(server, "good", "a password of the old days") == grpc.StatusCode.OK
    assert sorted(
        d["username"] for d in stored_users(server.settings.mongodb_uri, server.settings.mongodb_database)
    ) == [
        server.admin_username,
        "anadmin",
        "good",
    ]
    (summary,) = [r for r in caplog.records if r.getMessage() == "users imported"]
    assert (summary.users_created, summary.users_refused) == (2, 8)  # type: ignore[attr-defined]
    assert good_hash not in caplog.text


def item_violations(result: pb.ImportUserResult) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    for detail in result.error.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
    return violations


def hashing_costs(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bcrypt cost of every job the server's hashing threads are given from now on, as it is
    given (the cost is read off the hash compared against, or the salt hashed with)."""
    costs: list[int] = []
    submit = server.app.executor.submit

    def counted(work: Callable[..., Any], *args: Any) -> Future[Any]:
        costs.extend(int(arg[4:6]) for arg in args if isinstance(arg, bytes) and arg.startswith(b"$2"))
        return submit(work, *args)

    monkeypatch.setattr(server.app.executor, "submit", counted)
    return costs


@BUILD_TIMEOUT  # may build, or wait for, the shared bcrypthash
def test_a_guess_on_an_imported_account_costs_no_more_hashing_than_on_a_native_one(
    server: RunningServer, bcrypthash: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit's flood: six anonymous guesses on an account imported at cost 16 held a hashing
    thread 3.5 s each. An import takes no cost above our own, and a costlier hash stored before
    that rule is not compared: N guesses cost the hashing of N guesses on a native account."""
    rounds = server.settings.bcrypt_rounds
    password = "the old system's password"
    ours, costlier = go_hashes(bcrypthash, [(rounds, password), (rounds + 1, password)])
    results = server.stub.ImportUsers(
        pb.ImportUsersRequest(
            users=[
                imported("costly", password_hash=costlier),
                imported("legacy", password_hash=ours),
                imported("native", password_hash=ours),
            ]
        )
    ).results
    assert status_of(results[0]) == grpc.StatusCode.INVALID_ARGUMENT
    assert item_violations(results[0]) == [
        ("users[0].password_hash", f"the bcrypt cost must be 04 to {rounds:02d} (USERS_BCRYPT_ROUNDS)")
    ]
    assert verify(server, "native", password) == grpc.StatusCode.OK  # now under our own scheme
    # "legacy" as if imported before the rule: its stored hash costs one more than ours.
    with raw_collection(server.settings.mongodb_uri, server.settings.mongodb_database, "users") as users:
        assert users.update_one({"username": "legacy"}, {"$set": {"password_hash": costlier}}).modified_count == 1

    costs = hashing_costs(server, monkeypatch)
    guesses = 4  # within the free tries, so every one reaches the hashing threads
    work = {}
    for name in ("native", "legacy"):
        costs.clear()
        with ThreadPoolExecutor(guesses) as pool:
            codes = list(pool.map(verify, [server] * guesses, [name] * guesses, ["a wrong guess"] * guesses))
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * guesses
        assert len(costs) == guesses
        work[name] = sum(2**cost for cost in costs)
    assert work["legacy"] <= work["native"]
    # Not compared at all, so even the right password fails: the owner resets it.
    assert verify(server, "legacy", password) == grpc.StatusCode.UNAUTHENTICATED


def test_more_than_1000_users_is_refused_whole(server: RunningServer) -> None:
    request = pb.ImportUsersRequest(users=[imported(f"u{n:04d}") for n in range(1001)])
    error = rpc_error(server.stub.ImportUsers, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(error) == {"users"}
    assert stored_users(server.settings.mongodb_uri, server.settings.mongodb_database, username="u0000") == []


def test_only_admins_import(server: RunningServer) -> None:
    request = pb.ImportUsersRequest(users=[imported("sneaky")])
    assert rpc_error(server.anonymous.ImportUsers, request).code() == grpc.StatusCode.UNAUTHENTICATED


def test_without_a_hash_no_password_works_until_a_reset(server: RunningServer, mail: MailSink) -> None:
    server.stub.ImportUsers(pb.ImportUsersRequest(users=[imported("nohash")]))
    wrong = rpc_error(server.stub.VerifyCredentials, pb.VerifyCredentialsRequest(identifier="nohash", password="x"))
    unknown = rpc_error(server.stub.VerifyCredentials, pb.VerifyCredentialsRequest(identifier="nobody", password="x"))
    assert (wrong.code(), wrong.details()) == (unknown.code(), unknown.details())
    assert verify(server, "nohash", "") == grpc.StatusCode.INVALID_ARGUMENT

    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="nohash"))
    new_password = "a brand new passphrase"
    server.anonymous.ResetPassword(
        pb.ResetPasswordRequest(
            token=reset_token(mail, "nohash@example.com"),
            new_password=new_password,
            new_password_confirmation=new_password,
        )
    )
    assert verify(server, "nohash", new_password) == grpc.StatusCode.OK
    (document,) = stored_users(server.settings.mongodb_uri, server.settings.mongodb_database, username="nohash")
    assert "password_scheme" not in document


@BUILD_TIMEOUT  # may build, or wait for, the shared bcrypthash
def test_unverified_users_are_pending_unmailed_and_can_activate(
    server: RunningServer, bcrypthash: Path, mail: MailSink
) -> None:
    (go_hash,) = go_hashes(bcrypthash, [(5, "the pending one's password")])
    result = server.stub.ImportUsers(
        pb.ImportUsersRequest(users=[imported("pending", email_verified=False, password_hash=go_hash)])
    ).results[0]
    assert not result.user.is_active
    # The right password says "not activated", as for a registered user; no mail went out.
    not_active = rpc_error(
        server.stub.VerifyCredentials,
        pb.VerifyCredentialsRequest(identifier="pending", password="the pending one's password"),
    )
    assert not_active.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(not_active).reason == "ACCOUNT_NOT_ACTIVE"
    assert not [m for m in mail.messages if m["To"] == "pending@example.com"]

    server.anonymous.ResendActivationCode(pb.ResendActivationCodeRequest(identifier="pending"))
    server.anonymous.ActivateUser(
        pb.ActivateUserRequest(identifier="pending", code=mail.code_for("pending@example.com"))
    )
    assert verify(server, "pending", "the pending one's password") == grpc.StatusCode.OK
