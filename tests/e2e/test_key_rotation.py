"""Rotating the key-encryption key with ``users-grpc keys rewrap`` (docs/operations.md, "Rotating
the key-encryption key"): what the old key sealed opens under the new one alone afterwards, and
the digests of codes and tokens stored before the rotation still match."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from bson import ObjectId
from cryptography.exceptions import InvalidTag

from tests.support.calls import (
    PASSWORD,
    Enrolled,
    create_request,
    independent_totp,
    raw_collection,
    reset_token,
    rpc_error,
    signed_up,
    users_grpc,
    wait_until,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import KEY_ENCRYPTION_KEY, RunningServer, make_settings
from users.v1 import user_service_pb2 as pb
from users_grpc.adapters.secrets_at_rest import derive_key
from users_grpc.config import Settings
from users_grpc.domain.ports import Clock
from users_grpc.ops.rewrap import rewrap
from users_grpc.services.tokens import KeyEncryption

NEW_KEY = os.urandom(32)


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


class Servers:
    """Servers this test starts and stops itself: each rotation step restarts with other keys."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[RunningServer] = []

    def start(self, clock: Clock, **changes: object) -> RunningServer:
        self.running.append(RunningServer(dataclasses.replace(self.settings, **changes), clock))  # type: ignore[arg-type]
        return self.running[-1]

    def stop(self, server: RunningServer) -> None:
        self.running.remove(server)
        server.stop()


@pytest.fixture
def servers(mongodb_uri: str, database_name: str, smtp_server: tuple[MailSink, int]) -> Iterator[Servers]:
    started = Servers(make_settings(mongodb_uri, database_name, smtp_server[1]))
    yield started
    for server in list(started.running):
        started.stop(server)


def test_after_a_rewrap_the_new_key_alone_opens_everything(
    servers: Servers, mail: MailSink, dead_smtp_port: int
) -> None:
    clock = FakeClock()  # one clock for every server, so the TOTP step moves only when the test says
    before = servers.start(clock)
    jane = Enrolled(before, mail, clock)  # MFA on: a TOTP secret sealed under the old key
    bob = signed_up(before, mail, "bob")  # a refresh token, stored as a digest
    servers.stop(before)
    # A mail waiting in the outbox, its body sealed under the old key: SMTP is down.
    offline = servers.start(clock, smtp_port=dead_smtp_port)
    offline.anonymous.CreateUser(create_request(username="carol", email="carol@example.com"))
    servers.stop(offline)

    # The rotation: replicas run with the new key, the old one listed as still opening.
    during = jane.server = servers.start(
        clock, key_encryption_key=NEW_KEY, old_key_encryption_keys=(KEY_ENCRYPTION_KEY,), smtp_port=dead_smtp_port
    )
    assert jane.sign_in(totp_code=jane.code()).user.id == jane.user_id
    clock.advance(seconds=30)
    rotation = {"USERS_KEY_ENCRYPTION_KEY": b64(NEW_KEY), "USERS_OLD_KEY_ENCRYPTION_KEYS": b64(KEY_ENCRYPTION_KEY)}
    first = users_grpc("keys", "rewrap", server_settings=during.settings, **rotation)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "signing keys: 1 re-sealed, 0 already under the current key",
        "TOTP secrets: 1 re-sealed, 0 already under the current key",
        "outbox mail: 1 re-sealed, 0 already under the current key",
        "digest root: 1 re-sealed, 0 already under the current key",
    ]
    again = users_grpc("keys", "rewrap", server_settings=during.settings, **rotation)
    assert again.returncode == 0, again.stderr
    assert all(line.split(": ", 1)[1].startswith("0 re-sealed") for line in again.stdout.splitlines()), again.stdout
    # The running replica serves on, through and after the rewrap.
    assert jane.sign_in(totp_code=jane.code()).user.id == jane.user_id
    clock.advance(seconds=30)
    servers.stop(during)

    after = jane.server = servers.start(clock, key_encryption_key=NEW_KEY)  # the old key is gone
    assert jane.sign_in(totp_code=jane.code()).user.id == jane.user_id
    # Digests made under the old key still match: the refresh token from before the rotation works.
    refreshed = after.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=bob.refresh_token))
    assert refreshed.access_token
    # The same signing key: a token signed before the rotation verifies.
    claims = after.stub.ValidateToken(pb.ValidateTokenRequest(access_token=bob.access_token)).claims
    assert claims.subject == bob.user.id
    # The queued mail opens under the new key and goes out once SMTP is back.
    assert mail.code_for("carol@example.com")


def test_a_wrong_old_key_list_is_one_clear_sentence(servers: Servers, mail: MailSink) -> None:
    server = servers.start(FakeClock())
    server.anonymous.CreateUser(create_request())
    wrong = {"USERS_KEY_ENCRYPTION_KEY": b64(NEW_KEY), "USERS_OLD_KEY_ENCRYPTION_KEYS": b64(os.urandom(32))}
    result = users_grpc("keys", "rewrap", server_settings=server.settings, **wrong)
    assert result.returncode == 2, result.stderr
    assert "does not open the signing keys stored in the database, nor does any key in" in result.stderr
    assert "USERS_OLD_KEY_ENCRYPTION_KEYS" in result.stderr
    assert "Traceback" not in result.stderr

    malformed = users_grpc(
        "keys", "rewrap", server_settings=server.settings, USERS_OLD_KEY_ENCRYPTION_KEYS=f"{b64(NEW_KEY)},not-a-key"
    )
    assert malformed.returncode == 2
    assert "USERS_OLD_KEY_ENCRYPTION_KEYS: entry 2 is not 32 random bytes in base64" in malformed.stderr
    assert b64(NEW_KEY) not in malformed.stderr  # a key is never echoed
    assert "Traceback" not in malformed.stderr


def test_a_secret_written_during_the_rewrap_is_never_overwritten(servers: Servers, mail: MailSink) -> None:
    """The rewrap re-seals each value by compare-and-set: a user who enrolls again between its
    read and its write keeps the new enrollment."""
    clock = FakeClock()
    before = servers.start(clock)
    jane = signed_up(before, mail)
    own = before.stub_for(jane.access_token)
    own.EnableMfa(pb.EnableMfaRequest(user_id=jane.user.id, password=PASSWORD))  # pending, under the old key
    servers.stop(before)
    during = servers.start(clock, key_encryption_key=NEW_KEY, old_key_encryption_keys=(KEY_ENCRYPTION_KEY,))
    own = during.stub_for(during.anonymous.Authenticate(
        pb.AuthenticateRequest(identifier="jane", password=PASSWORD)).access_token
    )  # fmt: skip
    app = during.app
    enrolled_again: list[str] = []

    class EnrollsMeanwhile:
        """The users repository, with jane enrolling again just before the rewrap writes."""

        def __getattr__(self, name: str) -> object:
            return getattr(app.stores.users, name)

        async def reseal_totp_secret(self, user_id: str, sealed: bytes, resealed: bytes) -> bool:
            if not enrolled_again:
                enrollment = await asyncio.to_thread(
                    own.EnableMfa, pb.EnableMfaRequest(user_id=jane.user.id, password=PASSWORD)
                )
                enrolled_again.append(enrollment.secret)
            return await app.stores.users.reseal_totp_secret(user_id, sealed, resealed)

    report = during.call(
        rewrap(
            encryption=app.services.encryption,
            keys=app.stores.key_store,
            users=EnrollsMeanwhile(),  # type: ignore[arg-type]
            outbox=app.stores.outbox,
            material=app.stores.key_material,
        )
    )
    assert enrolled_again
    assert (report.totp_secrets.resealed, report.totp_secrets.current) == (0, 1)
    # The enrollment made meanwhile stands: its secret confirms.
    code = independent_totp(enrolled_again[0], clock.now().timestamp())
    assert own.ConfirmMfa(pb.ConfirmMfaRequest(user_id=jane.user.id, code=code)).recovery_codes


def legacy_digest(root: bytes, purpose: str, subject: str, secret: str) -> str:
    """A digest as root 0 makes it: what anyone holding ``root`` (a key-encryption key) can compute."""
    key = derive_key(root, f"digest/{purpose}")
    return hmac.new(key, f"{subject}\0{secret}".encode(), hashlib.sha256).hexdigest()


def stored(mongodb_uri: str, server: RunningServer, collection: str, **query: Any) -> dict[str, Any]:
    with raw_collection(mongodb_uri, server.settings.mongodb_database, collection) as documents:
        found = documents.find_one(query)
    assert found is not None, query
    return found


def test_a_new_digest_root_keys_new_digests_on_every_replica_and_old_digests_keep_matching(
    servers: Servers, mail: MailSink, mongodb_uri: str
) -> None:
    """After a leak of the key-encryption key: rotate it, rewrap, start a new digest root. The
    leaked key then derives no new digest, and what was pending before still works."""
    clock = FakeClock()
    before = servers.start(clock)
    bob = signed_up(before, mail, "bob")  # a refresh token, its digest under root 0
    before.anonymous.CreateUser(create_request(username="ann", email="ann@example.com"))  # a pending code
    old_robot = before.stub.CreateServiceAccount(pb.CreateServiceAccountRequest(name="old-robot"))
    jane = Enrolled(before, mail, clock)  # recovery codes
    dan = signed_up(before, mail, "dan")
    before.stub_for(dan.access_token).ChangeEmail(
        pb.ChangeEmailRequest(user_id=dan.user.id, new_email="dan@new.example.com", password=PASSWORD)
    )  # a pending email-change code
    signed_up(before, mail, "eve")
    before.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="eve"))  # a pending reset token
    servers.stop(before)

    # Two replicas on one database, on the new key; the old one still opens during the rewrap.
    rotation = {"USERS_KEY_ENCRYPTION_KEY": b64(NEW_KEY), "USERS_OLD_KEY_ENCRYPTION_KEYS": b64(KEY_ENCRYPTION_KEY)}
    keys = {"key_encryption_key": NEW_KEY, "old_key_encryption_keys": (KEY_ENCRYPTION_KEY,)}
    first, second = servers.start(clock, **keys), servers.start(clock, **keys)
    assert users_grpc("keys", "rewrap", server_settings=first.settings, **rotation).returncode == 0
    started = users_grpc(
        "keys", "rotate-digest-root", "--in-use-after", "0", server_settings=first.settings, **rotation
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("digest root 1 started: new digests use it from ")
    # The new root is sealed under the new key: the leaked one does not open it.
    sealed_root = bytes(stored(mongodb_uri, first, "key_material", _id="digest-root/1")["sealed"])
    with pytest.raises(InvalidTag):
        KeyEncryption(KEY_ENCRYPTION_KEY).open(sealed_root, "digest-root/1")
    # What each replica does every USERS_KEY_RELOAD_SECONDS (and at start).
    for replica in (first, second):
        replica.call(replica.app.reload_digest_roots())

    # A code pended on one replica is under the new root, and the other replica takes it.
    first.anonymous.CreateUser(create_request(username="carol", email="carol@example.com"))
    code = mail.code_for("carol@example.com")
    carol = stored(mongodb_uri, first, "users", username="carol")
    digest = carol["activation"]["digest"]
    assert digest.startswith("1:")
    assert digest.removeprefix("1:") not in {
        legacy_digest(key, "activation-code", str(carol["_id"]), code) for key in (KEY_ENCRYPTION_KEY, NEW_KEY)
    }
    assert second.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="carol", code=code)).user.username == "carol"

    # What was pending before the new root still matches, on either replica.
    old_code = mail.code_for("ann@example.com")
    assert second.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="ann", code=old_code)).user.username == "ann"
    refreshed = second.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=bob.refresh_token))
    session = stored(mongodb_uri, first, "sessions", _id=ObjectId(bob.session_id))
    assert session["token_digest"].startswith("1:")  # the session moved to the new root
    assert first.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=refreshed.refresh_token)).access_token
    secret = old_robot.client_secret
    client_id = old_robot.service_account.client_id
    assert second.anonymous.IssueServiceToken(pb.IssueServiceTokenRequest(client_id=client_id, client_secret=secret))

    jane.server = second
    assert jane.sign_in(recovery_code=jane.recovery_codes[0]).user.id == jane.user_id
    email_code = mail.code_for("dan@new.example.com")
    confirmed = second.stub_for(dan.access_token).ConfirmEmailChange(
        pb.ConfirmEmailChangeRequest(user_id=dan.user.id, code=email_code)
    )
    assert confirmed.user.email == "dan@new.example.com"
    new_password = "a brand new passphrase"
    second.anonymous.ResetPassword(
        pb.ResetPasswordRequest(
            token=reset_token(mail, "eve@example.com"),
            new_password=new_password,
            new_password_confirmation=new_password,
        )
    )
    assert second.anonymous.Authenticate(pb.AuthenticateRequest(identifier="eve", password=new_password)).user

    # A service account made now: its secret's digest is under the new root, and works on the other replica.
    robot = first.stub.CreateServiceAccount(pb.CreateServiceAccountRequest(name="robot"))
    robot_id = robot.service_account.client_id
    assert stored(mongodb_uri, first, "service_accounts", _id=ObjectId(robot_id))["secret_digest"].startswith("1:")
    issued = second.anonymous.IssueServiceToken(
        pb.IssueServiceTokenRequest(client_id=robot_id, client_secret=robot.client_secret)
    )
    assert issued.access_token
    # A wrong secret is still wrong, under either root.
    wrong = pb.IssueServiceTokenRequest(client_id=robot_id, client_secret=secret)
    assert rpc_error(second.anonymous.IssueServiceToken, wrong).code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_new_digest_root_is_not_used_before_its_time(servers: Servers, mail: MailSink, mongodb_uri: str) -> None:
    """By default a new root waits two key reloads, so every replica has it before any digest is
    made under it; until then new digests stay under the root before."""
    server = servers.start(FakeClock())
    started = users_grpc("keys", "rotate-digest-root", "--in-use-after", "3600", server_settings=server.settings)
    assert started.returncode == 0, started.stderr
    server.call(server.app.reload_digest_roots())
    server.anonymous.CreateUser(create_request(username="dora", email="dora@example.com"))
    dora = stored(mongodb_uri, server, "users", username="dora")
    code = mail.code_for("dora@example.com")
    assert dora["activation"]["digest"] == legacy_digest(KEY_ENCRYPTION_KEY, "activation-code", str(dora["_id"]), code)


def test_a_running_replica_loads_a_new_digest_root_at_its_next_key_reload(servers: Servers, mail: MailSink) -> None:
    server = servers.start(FakeClock(), key_reload_seconds=1.0)
    assert server.app.stores.secrets_at_rest.digest_root_versions == [0]
    started = users_grpc("keys", "rotate-digest-root", "--in-use-after", "0", server_settings=server.settings)
    assert started.returncode == 0, started.stderr
    wait_until(lambda: server.app.stores.secrets_at_rest.digest_root_versions == [1, 0], what="root 1 loaded")
    server.anonymous.CreateUser(create_request(username="eva", email="eva@example.com"))
    code = mail.code_for("eva@example.com")
    assert server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="eva", code=code)).user.username == "eva"
