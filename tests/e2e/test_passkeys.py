"""Passkeys through real channels, servers, FerretDB and SMTP, with the software authenticator
of tests/support/authenticator.py standing in for the browser and its platform authenticator."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from tests.e2e.test_change_feed import watch_until
from tests.support.authenticator import SoftwareAuthenticator, b64url, unb64url
from tests.support.calls import PASSWORD, _detail, error_info, raw_collection, rpc_error, signed_up
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink, text_of
from tests.support.servers import RunningServer, StartServer
from users.v1 import passkey_pb2 as pk
from users.v1 import password_policy_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.services.mfa import STEP_SECONDS, totp


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Person:
    server: RunningServer
    session: pb.AuthenticateResponse
    authenticator: SoftwareAuthenticator

    @property
    def stub(self) -> object:
        return self.server.stub_for(self.session.access_token)

    @property
    def id(self) -> str:
        return self.session.user.id


def register(person: Person, **knobs: object) -> pk.FinishPasskeyRegistrationResponse:
    stub = person.server.stub_for(person.session.access_token)
    started = stub.StartPasskeyRegistration(pk.StartPasskeyRegistrationRequest(user_id=person.id, password=PASSWORD))
    credential = person.authenticator.register(started.options_json, **knobs)  # type: ignore[arg-type]
    return stub.FinishPasskeyRegistration(
        pk.FinishPasskeyRegistrationRequest(
            user_id=person.id, ceremony_id=started.ceremony_id, credential_json=credential, display_name="Laptop"
        )
    )


def sign_in(
    server: RunningServer, authenticator: SoftwareAuthenticator, identifier: str = "", **knobs: object
) -> pk.FinishPasskeySignInResponse:
    started = server.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest(identifier=identifier))
    assertion = authenticator.get(started.options_json, **knobs)  # type: ignore[arg-type]
    return server.anonymous.FinishPasskeySignIn(
        pk.FinishPasskeySignInRequest(ceremony_id=started.ceremony_id, credential_json=assertion)
    )


def reason(call: object, request: object) -> str:
    error = rpc_error(call, request)
    return f"{error.code().name}/{error_info(error).reason}"


def person(server: RunningServer, mail: MailSink, name: str = "jane", algorithm: str = "ES256") -> Person:
    return Person(server, signed_up(server, mail, name), SoftwareAuthenticator(algorithm))  # type: ignore[arg-type]


@pytest.mark.parametrize(("algorithm", "attestation"), [("ES256", "none"), ("EdDSA", "packed")])
def test_register_then_sign_in_with_and_without_a_username(
    server: RunningServer, mail: MailSink, algorithm: str, attestation: str
) -> None:
    jane = person(server, mail, algorithm=algorithm)
    passkey = register(jane, attestation=attestation).passkey
    assert passkey.display_name == "Laptop"
    assert passkey.aaguid == "01234567-89ab-cdef-0123-456789abcdef"
    assert passkey.backup_eligible
    assert passkey.backed_up
    assert list(passkey.transports) == ["internal", "hybrid"]
    notice = mail.wait_for("jane@example.com", count=2)[1]  # after the activation code
    assert notice["Subject"].endswith("A passkey was added")
    assert '"Laptop" was added' in text_of(notice)
    # What to do if it was not her: the reset alone would leave the passkey working.
    assert "remove the passkey" in " ".join(text_of(notice).split())

    by_name = sign_in(server, jane.authenticator, "jane")
    usernameless = sign_in(server, jane.authenticator)
    for session in (by_name, usernameless):
        assert session.user.id == jane.id
        claims = server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=session.access_token)).claims
        assert claims.subject == jane.id
        assert session.refresh_token
    factors = (
        jane.server.stub_for(jane.session.access_token)
        .ListAuthenticationFactors(pk.ListAuthenticationFactorsRequest(user_id=jane.id))
        .factors
    )
    assert factors.password_set
    assert [p.id for p in factors.passkeys] == [passkey.id]
    assert factors.passkeys[0].HasField("last_use_time")


def test_the_user_handle_is_random_not_the_user_id_or_email(server: RunningServer, mail: MailSink) -> None:
    jane = person(server, mail)
    started = jane.server.stub_for(jane.session.access_token).StartPasskeyRegistration(
        pk.StartPasskeyRegistrationRequest(user_id=jane.id, password=PASSWORD)
    )
    handle = unb64url(json.loads(started.options_json)["user"]["id"])
    assert len(handle) == 32
    assert jane.id.encode() not in handle
    assert b"jane" not in handle


def test_a_challenge_works_once(server: RunningServer, mail: MailSink) -> None:
    jane = person(server, mail)
    register(jane)
    started = server.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest(identifier="jane"))
    assertion = jane.authenticator.get(started.options_json)
    finish = pk.FinishPasskeySignInRequest(ceremony_id=started.ceremony_id, credential_json=assertion)
    server.anonymous.FinishPasskeySignIn(finish)
    assert reason(server.anonymous.FinishPasskeySignIn, finish) == "UNAUTHENTICATED/INVALID_PASSKEY"


def test_concurrent_finishes_of_one_challenge_exactly_one_wins(start_server: StartServer, mail: MailSink) -> None:
    # The throttle counts each refused finish; past its free attempts it answers TOO_MANY_ATTEMPTS
    # instead, depending on how the eight interleave. Only the challenge may refuse one here.
    server = start_server(password_free_attempts=100, password_account_free_attempts=100)
    jane = person(server, mail)
    register(jane)
    jane.authenticator.counts = False  # both assertions alike: only the challenge can refuse one
    started = server.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest())
    finish = pk.FinishPasskeySignInRequest(
        ceremony_id=started.ceremony_id, credential_json=jane.authenticator.get(started.options_json)
    )

    def attempt(_: int) -> str:
        try:
            server.anonymous.FinishPasskeySignIn(finish)
        except grpc.RpcError as error:
            return str(error_info(error).reason)
        return "OK"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(attempt, range(8)))
    assert outcomes == ["INVALID_PASSKEY"] * 7 + ["OK"]


def test_an_expired_challenge_is_refused(start_server: StartServer, mail: MailSink, clock: FakeClock) -> None:
    server = start_server(clock=clock)
    jane = person(server, mail)
    register(jane)
    started = server.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest(identifier="jane"))
    clock.advance(seconds=server.settings.webauthn_ceremony_seconds + 1)
    finish = pk.FinishPasskeySignInRequest(
        ceremony_id=started.ceremony_id, credential_json=jane.authenticator.get(started.options_json)
    )
    assert reason(server.anonymous.FinishPasskeySignIn, finish) == "UNAUTHENTICATED/INVALID_PASSKEY"


def test_a_challenge_for_another_user_is_refused(server: RunningServer, mail: MailSink) -> None:
    jane, john = person(server, mail, "jane"), person(server, mail, "john")
    register(jane)
    register(john)
    started = server.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest(identifier="john"))
    finish = pk.FinishPasskeySignInRequest(
        ceremony_id=started.ceremony_id, credential_json=jane.authenticator.get(started.options_json)
    )
    assert reason(server.anonymous.FinishPasskeySignIn, finish) == "UNAUTHENTICATED/INVALID_PASSKEY"
    # A registration ceremony is its user's: another user cannot finish it.
    begun = jane.server.stub_for(jane.session.access_token).StartPasskeyRegistration(
        pk.StartPasskeyRegistrationRequest(user_id=jane.id, password=PASSWORD)
    )
    stolen = pk.FinishPasskeyRegistrationRequest(
        user_id=john.id, ceremony_id=begun.ceremony_id, credential_json=john.authenticator.register(begun.options_json)
    )
    assert (
        reason(john.server.stub_for(john.session.access_token).FinishPasskeyRegistration, stolen)
        == "INVALID_ARGUMENT/INVALID_PASSKEY_REGISTRATION"
    )


@pytest.mark.parametrize("knob", [{"origin": "https://evil.example"}, {"rp_id": "evil.example"}])
def test_a_wrong_origin_or_rp_id_is_refused(server: RunningServer, mail: MailSink, knob: dict[str, str]) -> None:
    jane = person(server, mail)
    with pytest.raises(grpc.RpcError) as refused:
        register(jane, **knob)
    assert error_info(refused.value).reason == "INVALID_PASSKEY_REGISTRATION"
    register(jane)
    with pytest.raises(grpc.RpcError) as refused:
        sign_in(server, jane.authenticator, "jane", **knob)
    assert error_info(refused.value).reason == "INVALID_PASSKEY"


def test_a_passwordless_sign_in_needs_user_verification(server: RunningServer, mail: MailSink) -> None:
    jane = person(server, mail)
    register(jane)
    with pytest.raises(grpc.RpcError) as refused:
        sign_in(server, jane.authenticator, user_verified=False)
    assert error_info(refused.value).reason == "INVALID_PASSKEY"


def test_a_sign_count_that_goes_back_is_refused_and_mailed(server: RunningServer, mail: MailSink) -> None:
    jane = person(server, mail)
    register(jane)
    sign_in(server, jane.authenticator, sign_count=5)
    with pytest.raises(grpc.RpcError) as refused:
        sign_in(server, jane.authenticator, sign_count=5)
    assert error_info(refused.value).reason == "PASSKEY_COUNTER_REGRESSED"
    notices = mail.wait_for("jane@example.com", count=3)
    assert "cloned passkey" in notices[2]["Subject"]


def test_a_credential_cannot_be_registered_twice(server: RunningServer, mail: MailSink) -> None:
    jane, john = person(server, mail, "jane"), person(server, mail, "john")
    register(jane, credential_id=b"\x01" * 16)
    for who in (jane, john):
        with pytest.raises(grpc.RpcError) as refused:
            register(who, credential_id=b"\x01" * 16)
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_info(refused.value).metadata["field"] == "credential_id"


def test_a_passkey_sign_in_waits_for_the_password_change_an_admin_required(
    server: RunningServer, mail: MailSink
) -> None:
    # An admin resetting a taken-over account: SetPassword with change_required ends every session,
    # and no sign-in opens one until the password the admin chose is replaced. A passkey the taker
    # added signed in past that (a whole session); now it gets the ChangePassword-only token, which
    # asks for the admin's password.
    jane = person(server, mail)
    register(jane)
    temporary = "temporary admin chosen words"
    server.stub.SetPassword(
        pb.SetPasswordRequest(
            user_id=jane.id, password=temporary, password_confirmation=temporary, change_required=True
        )
    )
    with pytest.raises(grpc.RpcError) as held:
        sign_in(server, jane.authenticator)
    assert held.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(held.value).reason == "PASSWORD_CHANGE_REQUIRED"
    token = _detail(held.value, password_policy_pb2.PasswordChangeRequired).password_change_token
    restricted = server.stub_for(token)
    denied = rpc_error(restricted.GetUser, pb.GetUserRequest(id=jane.id))
    assert error_info(denied).reason == "PASSWORD_CHANGE_ONLY"
    chosen = "a quiet river at dawn"
    restricted.ChangePassword(
        pb.ChangePasswordRequest(
            user_id=jane.id, current_password=temporary, new_password=chosen, new_password_confirmation=chosen
        )
    )
    assert sign_in(server, jane.authenticator).user.id == jane.id


def test_credential_json_nested_past_the_parser_is_refused_not_internal(server: RunningServer, mail: MailSink) -> None:
    # Within the 64 KiB allowed, JSON nested deeper than the parser goes raised RecursionError, which
    # no refusal caught: INTERNAL, from anyone (the sign-in needs no token).
    jane = person(server, mail)
    nested = "[" * 30_000
    started = server.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest())
    signing_in = pk.FinishPasskeySignInRequest(ceremony_id=started.ceremony_id, credential_json=nested)
    assert rpc_error(server.anonymous.FinishPasskeySignIn, signing_in).code() == grpc.StatusCode.INVALID_ARGUMENT
    stub = server.stub_for(jane.session.access_token)
    begun = stub.StartPasskeyRegistration(pk.StartPasskeyRegistrationRequest(user_id=jane.id, password=PASSWORD))
    registering = pk.FinishPasskeyRegistrationRequest(
        user_id=jane.id, ceremony_id=begun.ceremony_id, credential_json=nested
    )
    refused = rpc_error(stub.FinishPasskeyRegistration, registering)
    assert (refused.code(), error_info(refused).reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PASSKEY_REGISTRATION",
    )


def test_a_second_replica_finishes_what_the_first_started(start_server: StartServer, mail: MailSink) -> None:
    first, second = start_server(), start_server()
    jane = person(first, mail)
    register(jane)
    started = first.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest(identifier="jane"))
    finished = second.anonymous.FinishPasskeySignIn(
        pk.FinishPasskeySignInRequest(
            ceremony_id=started.ceremony_id, credential_json=jane.authenticator.get(started.options_json)
        )
    )
    assert finished.user.id == jane.id


def test_an_identifiers_options_tell_nothing_of_its_account(server: RunningServer, mail: MailSink) -> None:
    # allowCredentials listed an account's passkeys, and a decoy of one platform passkey for any other
    # identifier: two passkeys, or a security key's transports, told a real account from none. Every
    # passkey is discoverable (registered with a resident key required), so no list is needed at all.
    jane = person(server, mail)
    register(jane)
    register(jane)

    def options(identifier: str, second_factor: bool = False) -> dict[str, object]:
        request = pk.StartPasskeySignInRequest(identifier=identifier, second_factor=second_factor)
        started: dict[str, object] = json.loads(server.anonymous.StartPasskeySignIn(request).options_json)
        started.pop("challenge")
        return started

    for second_factor in (False, True):
        real = options("jane", second_factor)
        assert real == options("nobody", second_factor) == options("nobody@example.com", second_factor)
        assert real.get("allowCredentials", []) == []
    # The ceremony is still the named account's: jane signs in by name, john's passkey does not.
    assert sign_in(server, jane.authenticator, "jane").user.id == jane.id
    john = person(server, mail, "john")
    register(john)
    with pytest.raises(grpc.RpcError) as refused:
        sign_in(server, john.authenticator, "jane")
    assert error_info(refused.value).reason == "INVALID_PASSKEY"


def test_passkeys_are_renamed_and_removed_but_never_the_last_way_in(server: RunningServer, mail: MailSink) -> None:
    jane = person(server, mail)
    first, second = register(jane).passkey, register(jane).passkey
    stub = jane.server.stub_for(jane.session.access_token)
    renamed = stub.RenamePasskey(pk.RenamePasskeyRequest(user_id=jane.id, passkey_id=first.id, display_name="Phone"))
    assert renamed.passkey.display_name == "Phone"
    stub.RemovePasskey(pk.RemovePasskeyRequest(user_id=jane.id, passkey_id=first.id, password=PASSWORD))
    listed = stub.ListAuthenticationFactors(pk.ListAuthenticationFactorsRequest(user_id=jane.id)).factors
    assert [p.id for p in listed.passkeys] == [second.id]
    gone = pk.RemovePasskeyRequest(user_id=jane.id, passkey_id=first.id, password=PASSWORD)
    assert reason(stub.RemovePasskey, gone) == "NOT_FOUND/PASSKEY_NOT_FOUND"
    # An account without a usable password (as an import without a hash leaves it): its last
    # passkey is its only way in.
    with raw_collection(server.settings.mongodb_uri, server.settings.mongodb_database, "users") as users:
        users.update_one({"username": "jane"}, {"$set": {"password_scheme": "none"}})
    last = pk.RemovePasskeyRequest(user_id=jane.id, passkey_id=second.id)
    assert reason(stub.RemovePasskey, last) == "FAILED_PRECONDITION/LAST_SIGN_IN_METHOD"
    admin_removal = pk.RemoveUserPasskeyRequest(user_id=jane.id, passkey_id=second.id)
    assert reason(server.stub.RemoveUserPasskey, admin_removal) == "FAILED_PRECONDITION/LAST_SIGN_IN_METHOD"


def test_an_admin_removes_a_passkey_audited_and_mailed(server: RunningServer, mail: MailSink) -> None:
    jane = person(server, mail)
    passkey = register(jane).passkey
    factors = server.stub.ListUserAuthenticationFactors(pk.ListUserAuthenticationFactorsRequest(user_id=jane.id))
    assert [p.id for p in factors.factors.passkeys] == [passkey.id]
    server.stub.RemoveUserPasskey(pk.RemoveUserPasskeyRequest(user_id=jane.id, passkey_id=passkey.id))
    assert "removed by an administrator" in text_of(mail.wait_for("jane@example.com", count=3)[2])
    events = server.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(subject_id=jane.id, types=[pb.AUDIT_EVENT_TYPE_PASSKEY_REMOVE])
    ).audit_events
    assert [(e.actor.id, e.status_code) for e in events] == [(server.admin_id, 0)]
    with pytest.raises(grpc.RpcError) as refused:
        sign_in(server, jane.authenticator)
    assert error_info(refused.value).reason == "INVALID_PASSKEY"


def test_passkeys_are_off_without_their_settings(start_server: StartServer, mail: MailSink) -> None:
    server = start_server(webauthn_rp_id=None, webauthn_rp_name=None, webauthn_origins=())
    assert (
        reason(server.anonymous.StartPasskeySignIn, pk.StartPasskeySignInRequest())
        == "FAILED_PRECONDITION/PASSKEYS_DISABLED"
    )


def test_a_passkey_is_a_second_factor(server: RunningServer, mail: MailSink) -> None:
    """With TOTP on, Authenticate's second step takes a passkey assertion instead of a code."""
    jane = person(server, mail)
    register(jane)
    stub = jane.server.stub_for(jane.session.access_token)
    secret = stub.EnableMfa(pb.EnableMfaRequest(user_id=jane.id, password=PASSWORD)).secret
    stub.ConfirmMfa(pb.ConfirmMfaRequest(user_id=jane.id, code=totp(secret, int(time.time()) // STEP_SECONDS)))
    started = server.anonymous.StartPasskeySignIn(pk.StartPasskeySignInRequest(identifier="jane", second_factor=True))
    signed_in = server.anonymous.Authenticate(
        pb.AuthenticateRequest(
            identifier="jane",
            password=PASSWORD,
            passkey_ceremony_id=started.ceremony_id,
            passkey_credential_json=jane.authenticator.get(started.options_json, user_verified=False),
        )
    )
    assert signed_in.user.id == jane.id
    without = pb.AuthenticateRequest(identifier="jane", password=PASSWORD)
    assert reason(server.anonymous.Authenticate, without) == "FAILED_PRECONDITION/MFA_REQUIRED"


def test_every_passkey_event_is_audited_without_credential_material(server: RunningServer, mail: MailSink) -> None:
    """The five passkey event types (tests/e2e/test_audit.py leaves them here), and the change feed's
    added, used and removed, none carrying a credential id, key or signature."""
    jane = person(server, mail)
    passkey = register(jane).passkey
    sign_in(server, jane.authenticator)
    stub = jane.server.stub_for(jane.session.access_token)
    stub.RenamePasskey(pk.RenamePasskeyRequest(user_id=jane.id, passkey_id=passkey.id, display_name="Phone"))
    stub.RemovePasskey(pk.RemovePasskeyRequest(user_id=jane.id, passkey_id=passkey.id, password=PASSWORD))
    events = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(subject_id=jane.id, page_size=100)).audit_events
    passkey_types = {value for name, value in pb.AuditEventType.items() if name.startswith("AUDIT_EVENT_TYPE_PASSKEY_")}
    assert {e.type for e in events} >= passkey_types
    credential_id = jane.authenticator.credentials[0].credential_id
    for event in events:
        raw = event.SerializeToString()
        assert credential_id not in raw
        assert b64url(credential_id).encode() not in raw
    wanted = [pb.USER_CHANGE_TYPE_PASSKEY_ADDED, pb.USER_CHANGE_TYPE_PASSKEY_USED, pb.USER_CHANGE_TYPE_PASSKEY_REMOVED]

    def seen(changes: list[pb.UserChange]) -> bool:
        return [c.type for c in changes if c.user_id == jane.id and c.type in wanted] == wanted

    changes = watch_until(server.stub, "", seen)
    assert all(credential_id not in c.SerializeToString() for c in changes)
