"""Rotating the key-encryption key with ``users-grpc keys rewrap`` (docs/operations.md, "Rotating
the key-encryption key"): what the old key sealed opens under the new one alone afterwards, and
the digests of codes and tokens stored before the rotation still match."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
from collections.abc import Iterator

import pytest

from tests.support.calls import PASSWORD, Enrolled, create_request, independent_totp, signed_up, users_grpc
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import KEY_ENCRYPTION_KEY, RunningServer, make_settings
from users.v1 import user_service_pb2 as pb
from users_grpc.config import Settings
from users_grpc.ports import Clock
from users_grpc.rewrap import rewrap

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
            return getattr(app.users, name)

        async def reseal_totp_secret(self, user_id: str, sealed: bytes, resealed: bytes) -> bool:
            if not enrolled_again:
                enrollment = await asyncio.to_thread(
                    own.EnableMfa, pb.EnableMfaRequest(user_id=jane.user.id, password=PASSWORD)
                )
                enrolled_again.append(enrollment.secret)
            return await app.users.reseal_totp_secret(user_id, sealed, resealed)

    report = during.call(
        rewrap(
            encryption=app.encryption,
            keys=app.key_store,
            users=EnrollsMeanwhile(),  # type: ignore[arg-type]
            outbox=app.outbox,
            material=app.key_material,
        )
    )
    assert enrolled_again
    assert (report.totp_secrets.resealed, report.totp_secrets.current) == (0, 1)
    # The enrollment made meanwhile stands: its secret confirms.
    code = independent_totp(enrolled_again[0], clock.now().timestamp())
    assert own.ConfirmMfa(pb.ConfirmMfaRequest(user_id=jane.user.id, code=code)).recovery_codes
