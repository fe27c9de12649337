"""Guessing, floods and timing, through real channels: what a stranger cannot do to an owner.

Calls from another loopback address (127.0.0.2, ...) go through a relay whose upstream
socket is bound to that address, so the server sees a different peer.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    SourceAddressRelay,
    create_request,
    error_info,
    retry_delay,
    rpc_error,
    violated_fields,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink, text_of
from tests.support.servers import ADMIN_PASSWORD, RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc
from users_grpc.adapters.bcrypt_hasher import HASHING_NICENESS
from users_grpc.config import MIN_BCRYPT_ROUNDS

WRONG = "not the password at all"


@pytest.fixture
def from_address() -> Iterator[Callable[[RunningServer, str], user_service_pb2_grpc.UserServiceStub]]:
    """Anonymous stubs whose calls reach the server from the given loopback address."""
    opened: list[tuple[SourceAddressRelay, grpc.Channel]] = []

    def stub(server: RunningServer, host: str) -> user_service_pb2_grpc.UserServiceStub:
        relay = SourceAddressRelay(server.address, host)
        channel = grpc.insecure_channel(relay.address)
        opened.append((relay, channel))
        return user_service_pb2_grpc.UserServiceStub(channel)

    yield stub
    for relay, channel in opened:
        channel.close()
        relay.close()


def active_user(server: RunningServer, mail: MailSink, username: str = "jane") -> str:
    email = f"{username}@example.com"
    user = server.stub.CreateUser(create_request(username=username, email=email)).user
    server.stub.ActivateUser(pb.ActivateUserRequest(identifier=username, code=mail.code_for(email)))
    return user.id


def sign_in(stub: user_service_pb2_grpc.UserServiceStub, password: str, identifier: str = "jane") -> Any:
    return stub.Authenticate(pb.AuthenticateRequest(identifier=identifier, password=password))


def refused(stub: user_service_pb2_grpc.UserServiceStub, password: str, identifier: str = "jane") -> grpc.RpcError:
    return rpc_error(stub.Authenticate, pb.AuthenticateRequest(identifier=identifier, password=password))


def test_a_guesser_at_one_address_does_not_keep_the_owner_out_at_another(
    start_server: StartServer, mail: MailSink, from_address: Any
) -> None:
    server = start_server(clock=FakeClock())  # the one-second hold may not end between two calls
    active_user(server, mail)
    for _ in range(server.settings.password_free_attempts):
        assert refused(server.anonymous, WRONG).code() == grpc.StatusCode.UNAUTHENTICATED
    held = refused(server.anonymous, PASSWORD)  # the guesser's address now waits, right password or not
    assert held.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(held).reason == "TOO_MANY_ATTEMPTS"
    assert 0 < retry_delay(held) <= 1
    assert sign_in(from_address(server, "127.0.0.2"), PASSWORD).user.username == "jane"


def test_after_a_completed_reset_the_owner_signs_in_at_once(
    server: RunningServer, mail: MailSink, from_address: Any
) -> None:
    active_user(server, mail)
    guesser = from_address(server, "127.0.0.3")
    for _ in range(server.settings.password_free_attempts + 1):
        refused(guesser, WRONG)
    assert refused(guesser, PASSWORD).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    guesser.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    body = text_of(mail.wait_for("jane@example.com", 2)[1])
    token = re.search(r"new password:\s+(\S+)", body)
    assert token, body
    guesser.ResetPassword(
        pb.ResetPasswordRequest(token=token.group(1), new_password=NEW_PASSWORD, new_password_confirmation=NEW_PASSWORD)
    )
    assert sign_in(guesser, NEW_PASSWORD).user.username == "jane"


def test_parallel_guesses_cannot_exceed_the_free_tries(start_server: StartServer, mail: MailSink) -> None:
    # A still clock: no delay ends while the guesses settle. At the production floor: the hash is the
    # window in which a guess counted after its comparison would slip past the free tries.
    server = start_server(clock=FakeClock(), bcrypt_rounds=MIN_BCRYPT_ROUNDS)
    active_user(server, mail)
    request = pb.AuthenticateRequest(identifier="jane", password=WRONG)
    futures = [server.anonymous.Authenticate.future(request) for _ in range(16)]
    codes = [future.exception(timeout=30).code() for future in futures]  # type: ignore[union-attr]
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    # Each try is counted before its hash is compared: no more than the free tries reach a comparison.
    assert 1 <= codes.count(grpc.StatusCode.UNAUTHENTICATED) <= server.settings.password_free_attempts


def test_parallel_right_passwords_all_sign_in_while_parallel_guesses_stay_within_the_free_tries(
    start_server: StartServer, mail: MailSink
) -> None:
    """The audit: six parallel sign-ins with the right password, from one address and no failure
    before, were refused TOO_MANY_ATTEMPTS by contention alone. Many more than the free tries at
    once, for the owner and for a guesser of another account from the same address: every
    right password signs in, and no more wrong ones than the free tries reach a comparison."""
    # A still clock: no delay ends during the run; the production floor keeps the hash's window wide.
    server = start_server(clock=FakeClock(), bcrypt_rounds=MIN_BCRYPT_ROUNDS)
    active_user(server, mail)
    active_user(server, mail, "john")
    free = server.settings.password_free_attempts
    right = pb.AuthenticateRequest(identifier="jane", password=PASSWORD)
    wrong = pb.AuthenticateRequest(identifier="john", password=WRONG)
    tries = 2 * free + 2
    futures = [server.anonymous.Authenticate.future(request) for _ in range(tries) for request in (right, wrong)]
    signed_in = [future.result(timeout=60).user.username for future in futures[0::2]]
    guesses = [future.exception(timeout=60) for future in futures[1::2]]
    assert signed_in == ["jane"] * tries
    compared = [error for error in guesses if error.code() == grpc.StatusCode.UNAUTHENTICATED]  # type: ignore[union-attr]
    held = [error for error in guesses if error not in compared]
    assert 1 <= len(compared) <= free
    assert {(error.code(), error_info(error).reason) for error in held} == {  # type: ignore[union-attr, arg-type]
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS")
    }
    assert sign_in(server.anonymous, PASSWORD).user.username == "jane"


def test_guesses_from_many_addresses_are_held_account_wide_but_not_at_the_owners_address(
    start_server: StartServer, mail: MailSink, from_address: Any
) -> None:
    server = start_server(password_free_attempts=2, password_account_free_attempts=3)
    active_user(server, mail)
    assert sign_in(server.anonymous, PASSWORD).user.username == "jane"  # the owner's usual address
    for host, tries in (("127.0.0.4", 2), ("127.0.0.5", 1)):
        stub = from_address(server, host)
        for _ in range(tries):
            assert refused(stub, WRONG).code() == grpc.StatusCode.UNAUTHENTICATED
    newcomer = refused(from_address(server, "127.0.0.6"), PASSWORD)
    assert newcomer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sign_in(server.anonymous, PASSWORD).user.username == "jane"


def test_a_hashing_flood_is_refused_at_once_and_refused_tries_do_not_count(
    start_server: StartServer, mail: MailSink
) -> None:
    """24 sign-ins at once, each for its own name (so none waits on another's tally), against one
    hashing thread with two places in line: the rest are refused at once, and not counted."""
    server = start_server(hash_workers=1, hash_queue_length=2, bcrypt_rounds=12)
    active_user(server, mail)
    names = [f"nobody{n}" for n in range(24)]
    futures = [
        server.anonymous.Authenticate.future(pb.AuthenticateRequest(identifier=name, password=WRONG), timeout=30)
        for name in names
    ]
    errors = [future.exception(timeout=60) for future in futures]
    codes = [error.code() for error in errors]  # type: ignore[union-attr]
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    refused = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]  # type: ignore[union-attr]
    assert {error_info(e).reason for e in refused} == {"OVERLOADED"}  # type: ignore[arg-type]
    assert all(retry_delay(e) >= 1 for e in refused)  # type: ignore[arg-type]
    # Only the tries that reached a comparison count; a refused one was given back.
    keys = [f"password:unknown:{name}:127.0.0.1" for name in names]
    tallies = server.call(server.app.stores.throttles.get(keys))
    counted = [tallies[key].count if key in tallies else 0 for key in keys]
    assert counted == [1 if code == grpc.StatusCode.UNAUTHENTICATED else 0 for code in codes]
    assert sign_in(server.anonymous, PASSWORD).user.username == "jane"


def test_costly_anonymous_calls_are_limited_per_source(
    start_server: StartServer, mail: MailSink, from_address: Any
) -> None:
    # A still clock keeps every call in one window.
    server = start_server(rate_limit_requests=4, clock=FakeClock())
    forgot = pb.ForgotPasswordRequest(identifier="nobody")
    for _ in range(4):
        server.anonymous.ForgotPassword(forgot)
    limited = rpc_error(server.anonymous.ForgotPassword, forgot)
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(limited).reason == "RATE_LIMITED"
    assert 0 < retry_delay(limited) <= server.settings.rate_limit_window_seconds
    from_address(server, "127.0.0.7").ForgotPassword(forgot)  # another address has its own share
    server.stub.CreateUser(create_request())  # an admin's calls are not limited


def test_a_users_own_token_does_not_lift_the_limit(start_server: StartServer, mail: MailSink) -> None:
    """Anyone can register and hold a token: with one, the costly calls stay limited."""
    server = start_server(rate_limit_requests=5, clock=FakeClock())  # a still clock: one window throughout
    active_user(server, mail)  # through the admin: not counted
    stub = server.stub_for(sign_in(server.anonymous, PASSWORD).access_token)  # counted, in the sign-in flow's
    for _ in range(5):
        stub.ForgotPassword(pb.ForgotPasswordRequest(identifier="nobody"))
    limited = rpc_error(stub.ForgotPassword, pb.ForgotPasswordRequest(identifier="nobody"))
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(limited).reason == "RATE_LIMITED"


def outcome(call: Any, request: Any) -> object:
    """The call's response, or its error."""
    try:
        return call(request)
    except grpc.RpcError as error:
        return error


def flow_calls(server: RunningServer) -> dict[str, Callable[[int], object]]:
    """The n-th anonymous call of each budgeted flow from this test's address: its response or error."""
    anonymous = server.anonymous
    return {
        "sign-in": lambda n: outcome(
            anonymous.Authenticate, pb.AuthenticateRequest(identifier=f"nobody{n}", password=WRONG)
        ),
        "sign-up": lambda n: outcome(
            anonymous.CreateUser, create_request(username=f"new{n}", email=f"new{n}@example.com")
        ),
        "activation": lambda n: outcome(
            anonymous.ResendActivationCode, pb.ResendActivationCodeRequest(identifier=f"nobody{n}")
        ),
        "recovery": lambda n: outcome(anonymous.ForgotPassword, pb.ForgotPasswordRequest(identifier=f"nobody{n}")),
    }


def spend(call: Callable[[int], object], times: int) -> None:
    """Make ``times`` calls of one flow, each served within its budget."""
    for n in range(times):
        answer = call(n)
        if isinstance(answer, grpc.RpcError):
            assert answer.code() == grpc.StatusCode.UNAUTHENTICATED, answer  # a wrong password, not a limit


def assert_rate_limited(answer: object, server: RunningServer) -> None:
    assert isinstance(answer, grpc.RpcError), f"served past its budget: {answer!r}"
    assert answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
    assert error_info(answer).reason == "RATE_LIMITED"
    assert 0 < retry_delay(answer) <= server.settings.rate_limit_window_seconds


def test_a_sign_up_backend_that_spent_its_budget_leaves_sign_in_from_its_host_working(
    start_server: StartServer, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26: a sign-up backend's registrations used up the one per-source budget, and then the
    admin's own sign-in from that host was refused. Each flow now has a budget of its own."""
    server = start_server(rate_limit_requests=3, clock=FakeClock())  # a still clock: one window throughout
    sign_up = flow_calls(server)["sign-up"]
    spend(sign_up, 3)
    assert_rate_limited(sign_up(3), server)
    assert [getattr(r, "flow", None) for r in caplog.records if r.getMessage() == "rate limited"] == ["sign_up"]
    # The fixture's admin signed in once from here already; the sign-in budget has room for more.
    admin = pb.AuthenticateRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
    assert server.anonymous.Authenticate(admin).user.username == server.admin_username


def test_each_flows_budget_refuses_past_its_own_limit(start_server: StartServer, mail: MailSink) -> None:
    """One source spends the sign-in, sign-up, activation and recovery budgets in turn: each lasts
    its full limit whatever the others spent, then refuses with RetryInfo."""
    server = start_server(rate_limit_requests=3, clock=FakeClock())  # a still clock: one window throughout
    already_spent = {"sign-in": 1}  # the fixture's admin sign-in
    for flow, call in flow_calls(server).items():
        spend(call, 3 - already_spent.get(flow, 0))
        assert_rate_limited(call(99), server)


@pytest.mark.parametrize(
    ("flow", "setting"),
    [
        ("sign-in", "rate_limit_sign_in_requests"),
        ("sign-up", "rate_limit_sign_up_requests"),
        ("activation", "rate_limit_activation_requests"),
        ("recovery", "rate_limit_recovery_requests"),
    ],
)
def test_a_flows_budget_is_its_own_setting(start_server: StartServer, mail: MailSink, flow: str, setting: str) -> None:
    """A flow's own setting sets its budget; the other flows keep USERS_RATE_LIMIT_REQUESTS (here
    the suite's million)."""
    server = start_server(clock=FakeClock(), **{setting: 3})  # a still clock: one window throughout
    calls = flow_calls(server)
    spend(calls[flow], 3 - (flow == "sign-in"))  # the fixture's admin sign-in took one of sign-in's
    assert_rate_limited(calls[flow](99), server)
    for other, call in calls.items():
        if other != flow:
            spend(call, 4)


TIMED_PAIRS = 40


def median_ratio(unknown: Callable[[], object], existing: Callable[[], object]) -> float:
    """The median, over interleaved pairs, of each pair's time of ``unknown`` over ``existing``.

    A pair's two calls run back to back, so a change in the machine's load between pairs
    cancels out of its ratio; each pair runs in the other order from the one before, so
    neither side always goes first.
    """
    ratios = []
    order = [("existing", existing), ("unknown", unknown)]
    for _ in range(TIMED_PAIRS):
        order.reverse()
        times = {}
        for name, call in order:
            started = time.perf_counter()
            with contextlib.suppress(grpc.RpcError):
                call()
            times[name] = time.perf_counter() - started
        ratios.append(times["unknown"] / times["existing"])
    return statistics.median(ratios)


def test_timing_does_not_tell_whether_an_account_exists(start_server: StartServer, mail: MailSink) -> None:
    """Unknown over existing, median of 40 interleaved pairs, within 0.85 to 1/0.85 for every anonymous probe.

    Measured: a sign-in that skips the hash for a missing account gives about 0.13, ForgotPassword
    without its reply floor about 0.61. Noise on a busy machine (medians 0.97-0.98 under CI's load,
    about 0.02 apart from run to run) stays well inside the band.
    """
    server = start_server(
        password_free_attempts=100,
        password_account_free_attempts=100,
        reply_floor_seconds=0.05,
        # The measurements above are at the production floor; at the suite's cost 4 a skipped hash
        # would be too cheap to tell apart from the noise.
        bcrypt_rounds=MIN_BCRYPT_ROUNDS,
    )
    active_user(server, mail)
    server.stub.CreateUser(create_request(username="pending", email="pending@example.com"))
    anonymous, admin = server.anonymous, server.stub

    def probes(identifier: str) -> dict[str, Callable[[], object]]:
        return {
            "Authenticate": lambda: anonymous.Authenticate(
                pb.AuthenticateRequest(identifier=identifier, password=WRONG)
            ),
            "VerifyCredentials": lambda: admin.VerifyCredentials(
                pb.VerifyCredentialsRequest(identifier=identifier, password=WRONG)
            ),
            "ForgotPassword": lambda: anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier=identifier)),
        }

    def pending_probes(identifier: str) -> dict[str, Callable[[], object]]:
        return {
            "ActivateUser": lambda: anonymous.ActivateUser(
                pb.ActivateUserRequest(identifier=identifier, code="000000")
            ),
            "ResendActivationCode": lambda: anonymous.ResendActivationCode(
                pb.ResendActivationCodeRequest(identifier=identifier)
            ),
        }

    ratios = {}
    for existing, unknown in (
        (probes("jane"), probes("nobody")),
        (pending_probes("pending"), pending_probes("nobody")),
    ):
        for name in existing:
            ratios[name] = median_ratio(unknown[name], existing[name])
    assert all(0.85 <= ratio <= 1 / 0.85 for ratio in ratios.values()), ratios


def test_the_hashing_queue_keeps_the_owner_answered_under_an_anonymous_flood(
    start_server: StartServer, mail: MailSink, from_address: Any
) -> None:
    """A flood of unknown-name sign-ins from many connections: the owner is answered, never UNAVAILABLE."""
    server = start_server(hash_workers=1, hash_queue_length=4, bcrypt_rounds=12)
    active_user(server, mail)
    flood = pb.AuthenticateRequest(identifier="nobody", password=WRONG)
    stubs = [from_address(server, f"127.0.1.{n}") for n in range(1, 9)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        flooding = [pool.submit(rpc_error, stub.Authenticate, flood) for stub in stubs for _ in range(4)]
        owner_codes = []
        for _ in range(3):
            try:
                sign_in(server.anonymous, PASSWORD)
                owner_codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                owner_codes.append(error.code())
        flood_codes = {future.result(timeout=60).code() for future in flooding}
    assert flood_codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert set(owner_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert sign_in(server.anonymous, PASSWORD).user.username == "jane"


@pytest.mark.skipif(sys.platform != "linux", reason="a nice level per thread is Linux's")
def test_passwords_are_hashed_at_a_lower_cpu_priority_than_calls_are_answered(server: RunningServer) -> None:
    """Hashes take every idle core, but the event loop (and the database) are served first."""

    def nice_level() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def on_the_loop() -> int:
        return nice_level()

    answering = server.call(on_the_loop())
    hashing = server.app.executor.submit(nice_level).result(timeout=10)
    assert hashing == min(answering + HASHING_NICENESS, 19) > answering


def test_a_stranger_cannot_keep_the_owner_from_activating(
    server: RunningServer, mail: MailSink, from_address: Any
) -> None:
    """The audit's nine calls: resends up to the cap and wrong codes until the code dies. The owner,
    from another address, still activates with the token of the newest mail."""
    server.anonymous.CreateUser(create_request())
    stranger = server.anonymous
    for _ in range(server.settings.activation_max_sends - 1):
        stranger.ResendActivationCode(pb.ResendActivationCodeRequest(identifier="jane"))
    sends = server.settings.activation_max_sends
    newest_code = mail.code_for("jane@example.com", nth=sends)
    for n in range(1, server.settings.activation_max_attempts + 1):
        wrong = f"{(int(newest_code) + n) % 1_000_000:06d}"
        rpc_error(stranger.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=wrong))
    dead = rpc_error(stranger.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=newest_code))
    assert dead.code() == grpc.StatusCode.INVALID_ARGUMENT  # the code is used up, as designed

    owner = from_address(server, "127.0.0.9")
    owner.ResendActivationCode(pb.ResendActivationCodeRequest(identifier="jane"))  # capped: sends nothing
    token = mail.activation_token_for("jane@example.com", nth=sends)
    activated = owner.ActivateUser(pb.ActivateUserRequest(identifier="jane", token=token)).user
    assert activated.is_active
    assert len(mail.wait_for("jane@example.com", sends)) == sends  # the capped resend really sent nothing


def test_activation_tokens_work_once_and_only_the_newest(server: RunningServer, mail: MailSink) -> None:
    server.anonymous.CreateUser(create_request())
    first = mail.activation_token_for("jane@example.com")
    server.anonymous.ResendActivationCode(pb.ResendActivationCodeRequest(identifier="jane"))
    second = mail.activation_token_for("jane@example.com", nth=2)
    for token in (first, "x" * 43):
        error = rpc_error(server.anonymous.ActivateUser, pb.ActivateUserRequest(identifier="jane", token=token))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "INVALID_ACTIVATION_CODE"
    both = rpc_error(
        server.anonymous.ActivateUser, pb.ActivateUserRequest(identifier="jane", code="123456", token=second)
    )
    assert violated_fields(both) == {"token"}
    assert server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="Jane", token=second)).user.is_active
    again = rpc_error(server.anonymous.ActivateUser, pb.ActivateUserRequest(identifier="jane", token=second))
    assert again.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_token_outlives_the_code_but_not_its_own_lifetime(start_server: StartServer, mail: MailSink) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    server.anonymous.CreateUser(create_request())
    server.anonymous.CreateUser(create_request(username="late", email="late@example.com"))
    code = mail.code_for("jane@example.com")
    jane_token = mail.activation_token_for("jane@example.com")
    late_token = mail.activation_token_for("late@example.com")
    clock.advance(seconds=server.settings.activation_code_ttl_seconds + 1)
    expired = rpc_error(server.anonymous.ActivateUser, pb.ActivateUserRequest(identifier="jane", code=code))
    assert expired.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", token=jane_token)).user.is_active
    clock.advance(seconds=server.settings.activation_token_ttl_seconds)
    late = rpc_error(server.anonymous.ActivateUser, pb.ActivateUserRequest(identifier="late", token=late_token))
    assert late.code() == grpc.StatusCode.INVALID_ARGUMENT
