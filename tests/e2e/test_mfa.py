"""TOTP MFA through the real server: enrollment, QR codes, sign-in with a second factor,
replay and parallel use, throttling, recovery codes, disabling, and reset not bypassing MFA."""

from __future__ import annotations

import base64
import io
import time
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import png
import pytest
import zxingcpp

from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    Enrolled,
    error_info,
    independent_totp,
    raw_collection,
    reset,
    reset_token,
    rpc_error,
    signed_up,
    stored_users,
    violated_fields,
    wait_until,
    wait_until_mail_settled,
)
from tests.support.codes import codes_other_than
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def decode_qr(png_bytes: bytes) -> str:
    width, height, rows, _ = png.Reader(file=io.BytesIO(png_bytes)).asRGBA8()
    grey = bytes(row[i] for row in rows for i in range(0, width * 4, 4))
    [barcode] = zxingcpp.read_barcodes(memoryview(grey).cast("B", (height, width)))
    text: str = barcode.text
    return text


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def enrolled(start_server: StartServer, mail: MailSink, clock: FakeClock) -> Enrolled:
    return Enrolled(start_server(clock=clock), mail, clock)


def test_enrollment_shows_a_secret_uri_and_qr_code_that_agree(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    own = server.stub_for(session.access_token)
    enrollment = own.EnableMfa(pb.EnableMfaRequest(user_id=session.user.id, password=PASSWORD))
    assert len(base64.b32decode(enrollment.secret)) == 20  # 160 bits
    uri = urlparse(enrollment.otpauth_uri)
    query = parse_qs(uri.query)
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert query["secret"] == [enrollment.secret]
    assert query["issuer"] == [server.settings.mfa_issuer]
    assert "jane%40example.com" in uri.path or "jane@example.com" in uri.path
    assert decode_qr(enrollment.qr_code_png) == enrollment.otpauth_uri
    pending = own.GetMfaQrCode(pb.GetMfaQrCodeRequest(user_id=session.user.id))
    assert decode_qr(pending.qr_code_png) == enrollment.otpauth_uri
    # Still single-factor until confirmed.
    assert not own.GetUser(pb.GetUserRequest(id=session.user.id)).user.mfa_enabled
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    assert signed_in.access_token


def test_a_stolen_access_token_alone_cannot_turn_mfa_on(server: RunningServer, mail: MailSink) -> None:
    """With only the victim's token, EnableMfa and ConfirmMfa with the thief's authenticator took the
    account for good (even a reset left MFA on). EnableMfa now takes the password."""
    session = signed_up(server, mail)
    stolen = server.stub_for(session.access_token)
    missing = rpc_error(stolen.EnableMfa, pb.EnableMfaRequest(user_id=session.user.id))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(missing) == {"password"}
    guessed = rpc_error(stolen.EnableMfa, pb.EnableMfaRequest(user_id=session.user.id, password="a guessed password"))
    assert guessed.code() == UNAUTHENTICATED
    # Nothing was pended: no enrollment to confirm, and the password alone still signs in.
    no_enrollment = rpc_error(stolen.GetMfaQrCode, pb.GetMfaQrCodeRequest(user_id=session.user.id))
    assert no_enrollment.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD)).access_token
    # The owner, who knows the password, enrolls.
    assert stolen.EnableMfa(pb.EnableMfaRequest(user_id=session.user.id, password=PASSWORD)).secret


def test_a_wrong_confirmation_code_leaves_mfa_off(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    own = server.stub_for(session.access_token)
    secret = own.EnableMfa(pb.EnableMfaRequest(user_id=session.user.id, password=PASSWORD)).secret
    now = time.time()  # the step may turn before the server looks: none of three steps' codes
    [wrong] = codes_other_than(*(independent_totp(secret, now, offset) for offset in (-1, 0, 1)))
    error = rpc_error(own.ConfirmMfa, pb.ConfirmMfaRequest(user_id=session.user.id, code=wrong))
    assert error.code() == UNAUTHENTICATED
    assert not own.GetUser(pb.GetUserRequest(id=session.user.id)).user.mfa_enabled


def test_confirmed_mfa_is_shown_and_never_reveals_the_secret(enrolled: Enrolled) -> None:
    signed_in = enrolled.sign_in(totp_code=enrolled.code())
    own = enrolled.server.stub_for(signed_in.access_token)
    user = own.GetUser(pb.GetUserRequest(id=enrolled.user_id))
    assert user.user.mfa_enabled
    assert enrolled.secret.encode() not in user.SerializeToString()
    error = rpc_error(own.GetMfaQrCode, pb.GetMfaQrCodeRequest(user_id=enrolled.user_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        rpc_error(own.EnableMfa, pb.EnableMfaRequest(user_id=enrolled.user_id, password=PASSWORD)).code()
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert len(enrolled.recovery_codes) == 10


def test_password_alone_is_not_enough(enrolled: Enrolled) -> None:
    """Missing factor: FAILED_PRECONDITION MFA_REQUIRED, but only after the right password."""
    missing = enrolled.sign_in_error()
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(missing).reason == "MFA_REQUIRED"
    assert enrolled.sign_in_error(password="wrong password!").code() == UNAUTHENTICATED
    verify = pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD)
    assert rpc_error(enrolled.server.stub.VerifyCredentials, verify).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_codes_of_the_current_and_previous_step_work_others_do_not(enrolled: Enrolled) -> None:
    enrolled.clock.advance(seconds=30)  # so the previous step is one no code was used in
    accepted = {enrolled.code(), enrolled.code(-1)}
    for refused in (enrolled.code(+1), enrolled.code(-2)):
        if refused not in accepted:  # another step's code is the same once in 500,000
            assert enrolled.sign_in_error(totp_code=refused).code() == UNAUTHENTICATED
    assert enrolled.sign_in(totp_code=enrolled.code(-1)).access_token
    enrolled.clock.advance(seconds=30)
    verified = enrolled.server.stub.VerifyCredentials(
        pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD, totp_code=enrolled.code())
    )
    assert verified.user.id == enrolled.user_id


def test_a_code_works_once_even_sent_twice_at_once(enrolled: Enrolled) -> None:
    code = enrolled.code()
    request = pb.AuthenticateRequest(identifier="jane", password=PASSWORD, totp_code=code)
    futures = [enrolled.server.anonymous.Authenticate.future(request) for _ in range(2)]
    assert sum(f.exception(timeout=60) is None for f in futures) == 1
    assert enrolled.sign_in_error(totp_code=code).code() == UNAUTHENTICATED
    # Nor may an older step come after a newer one.
    assert enrolled.sign_in_error(totp_code=enrolled.code(-1)).code() == UNAUTHENTICATED


def test_wrong_codes_are_throttled(enrolled: Enrolled) -> None:
    """After five wrong codes even the right one is refused, until the window passes."""
    right = enrolled.code()
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for _ in range(5):
        assert enrolled.sign_in_error(totp_code=wrong).code() == UNAUTHENTICATED
    assert enrolled.sign_in_error(totp_code=right).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    enrolled.clock.advance(seconds=enrolled.server.settings.mfa_attempt_window_seconds + 1)
    assert enrolled.sign_in(totp_code=enrolled.code()).access_token


def test_recovery_codes_work_once_and_regenerating_kills_the_old_set(enrolled: Enrolled) -> None:
    first, second = enrolled.recovery_codes[:2]
    session = enrolled.sign_in(recovery_code=first.upper())
    assert enrolled.sign_in_error(recovery_code=first).code() == UNAUTHENTICATED
    own = enrolled.server.stub_for(session.access_token)
    fresh = own.RegenerateRecoveryCodes(
        pb.RegenerateRecoveryCodesRequest(user_id=enrolled.user_id, code=enrolled.code())
    ).recovery_codes
    assert set(fresh).isdisjoint(enrolled.recovery_codes)
    assert enrolled.sign_in_error(recovery_code=second).code() == UNAUTHENTICATED
    assert enrolled.sign_in(recovery_code=fresh[0]).access_token


def test_disable_needs_password_and_code_and_ends_sessions(
    enrolled: Enrolled, mail: MailSink, mongodb_uri: str
) -> None:
    session = enrolled.sign_in(totp_code=enrolled.code())
    own = enrolled.server.stub_for(session.access_token)
    enrolled.clock.advance(seconds=30)
    bad_password = pb.DisableMfaRequest(user_id=enrolled.user_id, password="not the password", code=enrolled.code())
    assert rpc_error(own.DisableMfa, bad_password).code() == UNAUTHENTICATED
    [wrong] = codes_other_than(enrolled.code(), enrolled.code(-1))
    bad_code = pb.DisableMfaRequest(user_id=enrolled.user_id, password=PASSWORD, code=wrong)
    assert rpc_error(own.DisableMfa, bad_code).code() == UNAUTHENTICATED
    own.DisableMfa(pb.DisableMfaRequest(user_id=enrolled.user_id, password=PASSWORD, code=enrolled.code()))
    assert rpc_error(own.GetUser, pb.GetUserRequest(id=enrolled.user_id)).code() == UNAUTHENTICATED
    assert enrolled.sign_in().access_token  # single-factor again
    wait_until(lambda: any(m["Subject"] == "Two-factor sign-in is off" for m in mail.messages), what="the notice")
    with raw_collection(mongodb_uri, enrolled.server.settings.mongodb_database, "outbox") as outbox:
        wait_until_mail_settled(outbox.database)  # a second copy, were there one, has arrived
    subjects = [m["Subject"] for m in mail.messages if m["To"] == "jane@example.com"]
    assert subjects.count("Two-factor sign-in is off") == 1


def test_reset_password_does_not_bypass_mfa(enrolled: Enrolled, mail: MailSink) -> None:
    enrolled.server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    reset(enrolled.server, reset_token(mail, "jane@example.com"))
    request = pb.AuthenticateRequest(identifier="jane", password=NEW_PASSWORD)
    missing = rpc_error(enrolled.server.anonymous.Authenticate, request)
    assert error_info(missing).reason == "MFA_REQUIRED"
    request.totp_code = enrolled.code()
    assert enrolled.server.anonymous.Authenticate(request).access_token


def test_totp_secret_is_encrypted_at_rest(enrolled: Enrolled, mongodb_uri: str) -> None:
    [stored] = stored_users(mongodb_uri, enrolled.server.settings.mongodb_database, username="jane")
    raw = repr(stored)
    assert enrolled.secret not in raw
    assert base64.b32decode(enrolled.secret) not in bytes(stored["mfa"]["sealed_secret"])
    assert all(code not in raw for code in enrolled.recovery_codes)


# Digits of other scripts (str.isdigit() says yes to all), and recovery-code look-alikes.
NOT_ASCII_CODES = [
    "\u0661\u0662\u0663\u0664\u0665\u0666",  # Arabic-Indic
    "\uff11\uff12\uff13\uff14\uff15\uff16",  # fullwidth
    "\u06f1\u06f2\u06f3\u06f4\u06f5\u06f6",  # extended Arabic-Indic (Persian)
    "\u0967\u0968\u0969\u096a\u096b\u096c",  # Devanagari
    "\uff41\uff42\uff43\uff44-\uff45\uff46\uff47\uff48-\uff49\uff4a\uff4b\uff4c",  # fullwidth letters
    "abcd\u2013efgh\u2013ijkl",  # en dashes
]


def test_codes_that_are_not_ascii_are_invalid_and_spend_no_attempt(enrolled: Enrolled, mongodb_uri: str) -> None:
    """More malformed codes than the attempt cap, in every RPC that takes one: each is
    INVALID_ARGUMENT naming its field, no counter moves, and the right codes still work."""
    session = enrolled.sign_in(totp_code=enrolled.code())
    own = enrolled.server.stub_for(session.access_token)
    admin = enrolled.server.stub
    user_id = enrolled.user_id

    def counters() -> tuple[object, object]:
        [stored] = stored_users(mongodb_uri, enrolled.server.settings.mongodb_database, username="jane")
        return stored["mfa"].get("failures"), stored.get("password_attempts", {}).get("failures")

    before = counters()
    verify, authenticate = admin.VerifyCredentials, enrolled.server.anonymous.Authenticate
    calls: list[tuple[Any, Any, str]] = []
    for code in NOT_ASCII_CODES:
        for field in ("totp_code", "recovery_code"):
            factor = {field: code}
            calls.append((verify, pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD, **factor), field))
            calls.append((authenticate, pb.AuthenticateRequest(identifier="jane", password=PASSWORD, **factor), field))
        calls.append((own.DisableMfa, pb.DisableMfaRequest(user_id=user_id, password=PASSWORD, code=code), "code"))
        regenerate = pb.RegenerateRecoveryCodesRequest(user_id=user_id, code=code)
        calls.append((own.RegenerateRecoveryCodes, regenerate, "code"))
    for call, request, field in calls:
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, error.details())
        assert violated_fields(error) == {field}
    assert counters() == before
    enrolled.clock.advance(seconds=30)
    fresh = own.RegenerateRecoveryCodes(
        pb.RegenerateRecoveryCodesRequest(user_id=user_id, code=enrolled.code())
    ).recovery_codes
    assert enrolled.sign_in(recovery_code=fresh[0]).access_token
    request = pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD, recovery_code=fresh[1].upper())
    assert admin.VerifyCredentials(request).user.id == user_id
