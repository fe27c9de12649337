"""Security notices and the changes they tell of are one durable step, and each goes out once.

ResetPassword with a deadline of 254-274 ms applied the reset and sent no notice; so did
ConfirmMfa at 38-40 ms. Each test here sweeps a caller's deadline across the whole range where
the change lands, one fresh user per call, through a real channel and a real SMTP server:
every call must end with the change applied and exactly one notice, or with neither.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import pytest
from bson import ObjectId
from pymongo import MongoClient

from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    create_request,
    independent_totp,
    reset_token,
    signed_up,
    wait_until,
    wait_until_mail_settled,
)
from tests.support.commands import CommandRecorder
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users_grpc.domain.model import Mail

Document = dict[str, Any]
SAMPLES = 60  # deadlines per sweep, each on a fresh user
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class Account:
    name: str
    email: str
    session: pb.AuthenticateResponse
    secret: str = ""  # the TOTP secret, once enrolled
    token: str = ""  # a pending reset token


def sign_up_many(server: RunningServer, mail: MailSink, prefix: str, count: int) -> list[Account]:
    """Register, activate and sign in ``count`` users, a few at a time (bcrypt runs in two threads,
    and each call's database budget includes its wait for them)."""

    def sign_up(name: str) -> Account:
        email = f"{name}@example.com"
        server.anonymous.CreateUser(create_request(username=name, email=email))
        server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier=name, code=mail.code_for(email)))
        session = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier=name, password=PASSWORD))
        return Account(name, email, session)

    return in_parallel(sign_up, [f"{prefix}{n}" for n in range(count)])


def in_parallel(work: Callable[[_T], _R], items: list[_T]) -> list[_R]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(work, items, timeout=150))


def users_collection(server: RunningServer, client: MongoClient[Document]) -> Any:
    return client[server.settings.mongodb_database].users


@dataclass
class Sweep:
    """How to prepare users for one RPC, call it, and tell whether its change was applied."""

    subject: str  # of the notice
    prepare: Callable[[RunningServer, MailSink, FakeClock, list[Account]], None]
    call: Callable[[RunningServer, FakeClock, Account, float | None], Any]
    applied: Callable[[Document, Document], bool]  # (stored before, stored after)


def run_sweep(
    server: RunningServer, mail: MailSink, clock: FakeClock, client: MongoClient[Document], sweep: Sweep
) -> None:
    # Measure the call where it always succeeds (no deadline), then sweep deadlines from 1 ms to
    # well past it, in steps fine enough to land several times on every stage of the call (a few
    # milliseconds on an idle machine; a loaded one stretches the calls and the steps alike).
    calibration = sign_up_many(server, mail, "cal", 3)
    sweep.prepare(server, mail, clock, calibration)
    durations = []
    for account in calibration:
        started = time.perf_counter()
        sweep.call(server, clock, account, None)
        durations.append(time.perf_counter() - started)
    top = 2 * max(durations) + 0.02
    step = max(top / SAMPLES, 0.001)
    deadlines = [0.001 + n * step for n in range(SAMPLES)]

    accounts = sign_up_many(server, mail, "swept", len(deadlines))
    sweep.prepare(server, mail, clock, accounts)
    users = users_collection(server, client)
    before = {a.name: users.find_one({"username": a.name}) for a in accounts}
    outcomes: dict[str, str] = {}
    for account, deadline in zip(accounts, deadlines, strict=True):
        try:
            sweep.call(server, clock, account, deadline)
            outcomes[account.name] = "OK"
        except grpc.RpcError as error:
            outcomes[account.name] = error.code().name
    after = {a.name: users.find_one({"username": a.name}) for a in accounts}
    applied = {a.name for a in accounts if sweep.applied(before[a.name], after[a.name])}

    def notices_by_address() -> Counter[str]:
        # One pass over the mail for all the accounts: a pass per account, at every poll, parsed
        # the headers of hundreds of mails sixty times over (seconds of CPU per sweep).
        return Counter(str(m["To"]) for m in list(mail.messages) if m["Subject"] == sweep.subject)

    def every_applied_change_noticed() -> bool:
        noticed = notices_by_address()
        return all(noticed[a.email] >= 1 for a in accounts if a.name in applied)

    # Every applied change's notice arrives within a bounded wait; then time for strays to show.
    with contextlib.suppress(AssertionError):  # reported below, with the whole sweep
        wait_until(every_applied_change_noticed, timeout=20, what="notices")
    wait_until_mail_settled(users.database)
    noticed = notices_by_address()

    def notices(account: Account) -> int:
        return noticed[account.email]

    def line(account: Account, deadline: float) -> str:
        return (
            f"{account.name} at {deadline * 1000:.1f} ms: {outcomes[account.name]}, "
            f"applied={account.name in applied}, notices={notices(account)}"
        )

    swept = list(zip(accounts, deadlines, strict=True))
    broken = [line(a, d) for a, d in swept if notices(a) != (1 if a.name in applied else 0)]
    assert not broken, "change and notice disagree:\n" + "\n".join(broken)
    # The sweep spans the change landing: short deadlines change nothing, long ones succeed.
    assert applied, "\n".join(line(a, d) for a, d in swept)
    assert len(applied) < len(accounts), "\n".join(line(a, d) for a, d in swept)


def _reset_prepare(server: RunningServer, mail: MailSink, clock: FakeClock, accounts: list[Account]) -> None:
    in_parallel(lambda a: server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier=a.name)), accounts)
    for account in accounts:
        account.token = reset_token(mail, account.email)


def _enroll(server: RunningServer, clock: FakeClock, accounts: list[Account]) -> None:
    def enroll(account: Account) -> None:
        own = server.stub_for(account.session.access_token)
        account.secret = own.EnableMfa(pb.EnableMfaRequest(user_id=account.session.user.id, password=PASSWORD)).secret

    in_parallel(enroll, accounts)


def _confirm(server: RunningServer, clock: FakeClock, account: Account, timeout: float | None) -> Any:
    code = independent_totp(account.secret, clock.now().timestamp())
    request = pb.ConfirmMfaRequest(user_id=account.session.user.id, code=code)
    return server.stub_for(account.session.access_token).ConfirmMfa(request, timeout=timeout)


def _enroll_and_confirm(server: RunningServer, mail: MailSink, clock: FakeClock, accounts: list[Account]) -> None:
    _enroll(server, clock, accounts)
    for account in accounts:
        _confirm(server, clock, account, None)
    clock.advance(seconds=30)  # the confirming codes' step is used up; confirming revoked the tokens

    def sign_in(account: Account) -> None:
        code = independent_totp(account.secret, clock.now().timestamp())
        account.session = server.anonymous.Authenticate(
            pb.AuthenticateRequest(identifier=account.name, password=PASSWORD, totp_code=code)
        )

    in_parallel(sign_in, accounts)
    clock.advance(seconds=30)


SWEEPS = {
    "ResetPassword": Sweep(
        subject="Your password was reset",
        prepare=_reset_prepare,
        call=lambda server, _clock, account, timeout: server.anonymous.ResetPassword(
            pb.ResetPasswordRequest(
                token=account.token, new_password=NEW_PASSWORD, new_password_confirmation=NEW_PASSWORD
            ),
            timeout=timeout,
        ),
        applied=lambda before, after: before["password_hash"] != after["password_hash"],
    ),
    "ChangePassword": Sweep(
        subject="Your password was changed",
        prepare=lambda *_: None,
        call=lambda server, _clock, account, timeout: server.stub_for(account.session.access_token).ChangePassword(
            pb.ChangePasswordRequest(
                user_id=account.session.user.id,
                current_password=PASSWORD,
                new_password=NEW_PASSWORD,
                new_password_confirmation=NEW_PASSWORD,
            ),
            timeout=timeout,
        ),
        applied=lambda before, after: before["password_hash"] != after["password_hash"],
    ),
    "ConfirmMfa": Sweep(
        subject="Two-factor sign-in is on",
        prepare=lambda server, _mail, clock, accounts: _enroll(server, clock, accounts),
        call=_confirm,
        applied=lambda _before, after: (after.get("mfa") or {}).get("state") == "active",
    ),
    "DisableMfa": Sweep(
        subject="Two-factor sign-in is off",
        prepare=_enroll_and_confirm,
        call=lambda server, clock, account, timeout: server.stub_for(account.session.access_token).DisableMfa(
            pb.DisableMfaRequest(
                user_id=account.session.user.id,
                password=PASSWORD,
                code=independent_totp(account.secret, clock.now().timestamp()),
            ),
            timeout=timeout,
        ),
        applied=lambda _before, after: after.get("mfa") is None,
    ),
}


def _change_email_prepare(server: RunningServer, mail: MailSink, clock: FakeClock, accounts: list[Account]) -> None:
    def change(account: Account) -> None:
        request = pb.ChangeEmailRequest(
            user_id=account.session.user.id, new_email=f"new-{account.email}", password=PASSWORD
        )
        server.stub_for(account.session.access_token).ChangeEmail(request)

    in_parallel(change, accounts)
    for account in accounts:
        account.token = mail.code_for(f"new-{account.email}")


SWEEPS["ConfirmEmailChange"] = Sweep(
    subject="Your email address was changed",
    prepare=_change_email_prepare,
    call=lambda server, _clock, account, timeout: server.stub_for(account.session.access_token).ConfirmEmailChange(
        pb.ConfirmEmailChangeRequest(user_id=account.session.user.id, code=account.token), timeout=timeout
    ),
    applied=lambda before, after: before["email"] != after["email"],
)
SWEEPS["SetUserEmail"] = Sweep(
    subject="Your email address was changed",
    prepare=lambda *_: None,
    call=lambda server, _clock, account, timeout: server.stub.SetUserEmail(
        pb.SetUserEmailRequest(user_id=account.session.user.id, email=f"set-{account.email}"), timeout=timeout
    ),
    applied=lambda before, after: before["email"] != after["email"],
)


@pytest.mark.parametrize("rpc", list(SWEEPS))
@pytest.mark.timeout(600)  # sixty-odd users to set up, each with a password hash or two
def test_a_deadline_never_applies_a_change_without_its_notice(
    start_server: StartServer, mail: MailSink, mongodb_uri: str, rpc: str
) -> None:
    clock = FakeClock(start=datetime.now(UTC))
    # The reply floor of ForgotPassword and ActivateUser would only slow the setup of many users.
    server = start_server(clock=clock, reply_floor_seconds=0.01)
    client: MongoClient[Document] = MongoClient(mongodb_uri, tz_aware=True)
    with client:
        run_sweep(server, mail, clock, client, SWEEPS[rpc])


def pend_notice(users: Any, user_id: str, subject: str, *, claimed_for: float | None = None) -> ObjectId:
    """Write a notice into a user's document as the change's update does, as if the server that
    made the change died right after it; optionally with a sender's claim of ``claimed_for`` seconds."""
    notice_id = ObjectId()
    now = datetime.now(UTC)
    update: Document = {
        "$push": {"pending_mail": {"id": notice_id, "to": "jane@example.com", "subject": subject, "body": "Hi.\n"}},
        "$min": {"pending_mail_since": now},
    }
    if claimed_for is not None:
        update["$set"] = {
            "pending_mail_claim": {"token": "a dead sender", "until": now + timedelta(seconds=claimed_for)}
        }
    assert users.update_one({"_id": ObjectId(user_id)}, update).modified_count == 1
    return notice_id


def delivered_once(mail: MailSink, subject: str, users: Any) -> None:
    """Exactly one mail with this subject arrives, counted once nothing is left that could send another."""
    wait_until(lambda: any(m["Subject"] == subject for m in mail.messages), what=subject)
    wait_until_mail_settled(users.database)
    assert [m["Subject"] for m in mail.messages].count(subject) == 1


@pytest.fixture
def users(server: RunningServer, mongodb_uri: str) -> Iterator[Any]:
    client: MongoClient[Document] = MongoClient(mongodb_uri, tz_aware=True)
    with client:
        yield users_collection(server, client)


def test_a_notice_left_pending_by_a_crash_is_delivered_once(server: RunningServer, mail: MailSink, users: Any) -> None:
    user_id = server.anonymous.CreateUser(create_request()).user.id
    pend_notice(users, user_id, "Left by a crash")
    delivered_once(mail, "Left by a crash", users)
    [stored] = users.find({"_id": ObjectId(user_id)})
    assert {"pending_mail", "pending_mail_since"}.isdisjoint(stored)


def test_a_notice_queued_but_not_dropped_before_a_crash_is_delivered_once(
    server: RunningServer, mail: MailSink, users: Any
) -> None:
    """The sender queued the notice and died before dropping it from the user's document."""
    user_id = server.anonymous.CreateUser(create_request()).user.id
    notice_id = pend_notice(users, user_id, "Queued, then a crash")
    queued = Mail(to="jane@example.com", subject="Queued, then a crash", body="Hi.\n")
    server.call(server.app.stores.outbox.enqueue(queued, datetime.now(UTC), mail_id=str(notice_id), notice_of=user_id))
    delivered_once(mail, "Queued, then a crash", users)


def test_a_notice_queued_by_an_older_version_before_a_crash_is_delivered_once(
    server: RunningServer, mail: MailSink, users: Any
) -> None:
    """A sender of a version before outbox copies recorded whose notice they are claimed the
    notice, queued its copy and died holding the claim: the copy still waits for the claim."""
    user_id = server.anonymous.CreateUser(create_request()).user.id
    notice_id = pend_notice(users, user_id, "Queued by an older version", claimed_for=1.5)
    queued = Mail(to="jane@example.com", subject="Queued by an older version", body="Hi.\n")
    outbox = users.database.outbox
    # Queued due in an hour, so that no sender takes it before it looks as an older version left it.
    later = datetime.now(UTC) + timedelta(hours=1)
    server.call(server.app.stores.outbox.enqueue(queued, later, mail_id=str(notice_id), notice_of=user_id))
    assert outbox.update_one({"_id": notice_id}, {"$unset": {"notice_of": ""}}).modified_count == 1
    assert outbox.update_one({"_id": notice_id}, {"$set": {"next_attempt_at": datetime.now(UTC)}}).modified_count == 1
    delivered_once(mail, "Queued by an older version", users)


def test_a_notice_claimed_by_a_sender_that_died_is_delivered_once_its_claim_runs_out(
    server: RunningServer, mail: MailSink, users: Any
) -> None:
    """A sender claimed the notice, queued it and died holding the claim: the copy in the outbox
    waits until the claim runs out (were it sent and deleted at once, the notice still in the
    user's document would be moved and sent again), then goes out once."""
    user_id = server.anonymous.CreateUser(create_request()).user.id
    notice_id = pend_notice(users, user_id, "Claimed, then a crash", claimed_for=1.5)
    queued = Mail(to="jane@example.com", subject="Claimed, then a crash", body="Hi.\n")
    server.call(server.app.stores.outbox.enqueue(queued, datetime.now(UTC), mail_id=str(notice_id), notice_of=user_id))
    # The sender found the copy and put it off (a postponement counts no attempt) while the claim runs.
    outbox = users.database.outbox
    wait_until(lambda: outbox.count_documents({"_id": notice_id, "attempts": 0, "status": "pending",
                                               "next_attempt_at": {"$gt": datetime.now(UTC)}}) == 1,
               what="the copy put off")  # fmt: skip
    assert not any(m["Subject"] == "Claimed, then a crash" for m in mail.messages)
    delivered_once(mail, "Claimed, then a crash", users)


def test_replicas_move_each_notice_once(start_server: StartServer, mail: MailSink, mongodb_uri: str) -> None:
    """Two replicas race for the same notices: each goes out once."""
    replicas = [start_server(mail_poll_seconds=0.05), start_server(mail_poll_seconds=0.05)]
    client: MongoClient[Document] = MongoClient(mongodb_uri, tz_aware=True)
    with client:
        users = users_collection(replicas[0], client)
        requests = [create_request(username=f"user{n}", email=f"user{n}@example.com") for n in range(5)]
        ids = [replicas[0].anonymous.CreateUser(request).user.id for request in requests]
        for n, user_id in enumerate(ids):
            for k in range(3):
                pend_notice(users, user_id, f"notice {n}.{k}")
        wait_until(lambda: sum(m["Subject"].startswith("notice ") for m in mail.messages) >= 15, what="15 notices")
        wait_until_mail_settled(users.database)
        subjects = sorted(m["Subject"] for m in mail.messages if m["Subject"].startswith("notice "))
        assert subjects == sorted(f"notice {n}.{k}" for n in range(5) for k in range(3))
        assert users.count_documents({"pending_mail_since": {"$exists": True}}) == 0


def notice_searches(queries: CommandRecorder) -> int:
    """The mail sender's searches of users for pended notices (on the embedded database, each
    reads every user)."""
    return sum(
        1
        for c in queries.commands
        if c.document.get("findAndModify") == "users" and "pending_mail_since" in str(c.document.get("query"))
    )


def test_the_sender_searches_users_for_notices_only_when_one_was_pended_or_at_a_poll(
    start_server: StartServer, mail: MailSink
) -> None:
    queries = CommandRecorder({"findAndModify"})
    server = start_server(mail_poll_seconds=60, event_listeners=[queries])  # no poll during the test
    wait_until(lambda: notice_searches(queries) >= 1, what="the search at start")
    queries.clear()
    session = signed_up(server, mail)  # two mails (the activation code, the welcome), no notice
    assert notice_searches(queries) == 0
    server.stub_for(session.access_token).ChangePassword(
        pb.ChangePasswordRequest(
            user_id=session.user.id,
            current_password=PASSWORD,
            new_password=NEW_PASSWORD,
            new_password_confirmation=NEW_PASSWORD,
        )
    )
    wait_until(lambda: any(m["Subject"] == "Your password was changed" for m in mail.messages), what="the notice")
    assert notice_searches(queries) >= 1
