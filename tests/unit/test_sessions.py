"""Sessions on fakes: sign-in, refresh-token rotation and replay, sign-out, access-token revocation."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.fakes import FakeCredentialRepository, FakeKeyStore, FakeSessionRepository
from tests.support.world import PASSWORD, World, run
from users_grpc.domain.errors import InvalidArgument, InvalidCredentials, MfaRequired, TooManyAttempts, Unauthenticated
from users_grpc.domain.model import IssuedTokens, UserState
from users_grpc.services.accounts import AccountPolicy
from users_grpc.services.mfa import STEP_SECONDS, MfaService, totp
from users_grpc.services.sessions import SessionService
from users_grpc.services.tokens import AccessTokens, KeyEncryption

LIFETIME = timedelta(days=30)
SOURCE = "10.0.0.1"


class Sessions(World):
    def __init__(self) -> None:
        self.credentials = FakeCredentialRepository()
        # No reply floor: it is the account service's tests' concern.
        super().__init__(AccountPolicy(reply_floor=timedelta(0)), users=self.credentials)
        self.sessions = FakeSessionRepository()
        self.mfa = MfaService(
            accounts=self.service,
            credentials=self.credentials,
            sessions=self.sessions,
            mailer=self.mailer,
            encryption=KeyEncryption(os.urandom(32)),
            digests=self.digests,
            clock=self.clock,
            issuer="Example",
            max_attempts=3,
            attempt_window=timedelta(minutes=5),
        )
        self.tokens = AccessTokens(
            store=FakeKeyStore(),
            encryption=KeyEncryption(os.urandom(32)),
            clock=self.clock,
            issuer="https://users.example.com",
            audience="users-api",
            lifetime=timedelta(minutes=15),
        )
        run(self.tokens.ensure_signing_key())
        self.session_service = SessionService(
            logins=self.mfa,
            users=self.users,
            sessions=self.sessions,
            tokens=self.tokens,
            digests=self.digests,
            clock=self.clock,
            session_lifetime=LIFETIME,
        )
        self.user = self.create()
        run(self.service.activate_user("jane", self.last_code()))

    def sign_in(self) -> IssuedTokens:
        user, issued = run(self.session_service.authenticate("jane", PASSWORD, source=SOURCE))
        assert user.id == self.user.id
        return issued

    def step(self) -> int:
        return int(self.clock.now().timestamp()) // STEP_SECONDS

    def refresh(self, token: str) -> IssuedTokens:
        return run(self.session_service.refresh(token))

    def refused(self, token: str) -> None:
        with pytest.raises(Unauthenticated, match=r"^invalid refresh token$"):
            self.refresh(token)

    def revoked(self, session_id: str) -> bool:
        return self.sessions.records[session_id].revoked_at is not None

    def mint(self, session_id: str, generation: int) -> str:
        """A genuine token of the session's ``generation``, made as the format says: ``session.
        generation.secret``, the secret 16 random bytes and the first 16 bytes of their keyed
        digest under "refresh-token-tag" (users_grpc/services/sessions.py), in unpadded URL-safe base64."""
        nonce = os.urandom(16)
        tag = bytes.fromhex(self.digests.digest("refresh-token-tag", session_id, f"{generation}.{b64(nonce)}"))[:16]
        return f"{session_id}.{generation}.{b64(nonce + tag)}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def world() -> Sessions:
    return Sessions()


def logged(caplog: pytest.LogCaptureFixture, message: str) -> dict[str, Any]:
    records = [r for r in caplog.records if r.name == "users_grpc.services.sessions" and r.getMessage() == message]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    return records[0].__dict__


class TestSignIn:
    def test_sign_in_opens_a_session_for_its_lifetime(self, world: Sessions, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO)
        issued = world.sign_in()
        session = issued.session
        assert session.user_id == world.user.id
        assert (session.created_at, session.last_used_at) == (world.clock.now(), world.clock.now())
        assert session.expires_at == world.clock.now() + LIFETIME
        assert session.token_version == world.user.token_version
        assert re.fullmatch(rf"{session.id}\.0\.[A-Za-z0-9_-]{{43}}", issued.refresh_token)
        claims = run(world.session_service.validate(issued.access_token))
        assert (claims.subject, claims.session_id) == (world.user.id, session.id)
        assert issued.access_token_expires_at == claims.expires_at
        extra = logged(caplog, "session opened")
        assert (extra["user_id"], extra["session_id"]) == (world.user.id, session.id)

    def test_the_database_keeps_only_a_keyed_digest_of_the_refresh_token(self, world: Sessions) -> None:
        issued = world.sign_in()
        stored = world.sessions.records[issued.session.id].token_digest
        assert issued.refresh_token.split(".")[2] not in stored
        assert stored == world.digests.digest("refresh-token", issued.session.id, issued.refresh_token)

    def test_with_mfa_on_sign_in_takes_the_second_factor(self, world: Sessions) -> None:
        secret = run(world.mfa.enable(world.user.id, PASSWORD, source=SOURCE)).secret
        codes = run(world.mfa.confirm(world.user.id, totp(secret, world.step())))
        world.clock.advance(seconds=STEP_SECONDS)
        with pytest.raises(MfaRequired):
            run(world.session_service.authenticate("jane", PASSWORD, source=SOURCE))
        user, _ = run(world.session_service.authenticate("jane", PASSWORD, totp(secret, world.step()), source=SOURCE))
        assert user.id == world.user.id
        _, issued = run(world.session_service.authenticate("jane", PASSWORD, "", codes[0], source=SOURCE))
        assert issued.session.token_version == 1
        assert len(world.sessions.records) == 2

    def test_wrong_passwords_from_one_address_do_not_hold_the_owner_at_another(self, world: Sessions) -> None:
        for _ in range(5):
            with pytest.raises(InvalidCredentials):
                run(world.session_service.authenticate("jane", "not the password", source="10.6.6.6"))
        with pytest.raises(TooManyAttempts):
            run(world.session_service.authenticate("jane", PASSWORD, source="10.6.6.6"))
        assert world.sign_in().session.user_id == world.user.id

    def test_a_wrong_password_opens_nothing(self, world: Sessions) -> None:
        with pytest.raises(InvalidCredentials):
            run(world.session_service.authenticate("jane", "not the password", source=SOURCE))
        assert world.sessions.records == {}

    def test_a_session_carries_the_token_version_of_its_sign_in(self, world: Sessions) -> None:
        run(world.users.bump_token_version(world.user.id, world.clock.now()))
        issued = world.sign_in()
        assert issued.session.token_version == 1
        assert world.refresh(issued.refresh_token).session.token_version == 1


class TestRefresh:
    def test_a_refresh_token_works_once_and_gives_the_next(self, world: Sessions) -> None:
        first = world.sign_in()
        world.clock.advance(minutes=5)
        second = world.refresh(first.refresh_token)
        assert second.session.id == first.session.id
        assert second.session.last_used_at == world.clock.now()
        assert second.refresh_token.startswith(f"{first.session.id}.1.")
        claims = run(world.session_service.validate(second.access_token))
        assert claims.session_id == first.session.id
        assert claims.issued_at == world.clock.now()
        third = world.refresh(second.refresh_token)
        assert third.refresh_token.startswith(f"{first.session.id}.2.")
        record = world.sessions.records[first.session.id]
        assert record.token_digest == world.digests.digest("refresh-token", first.session.id, third.refresh_token)

    def test_a_token_tagged_under_a_newer_digest_root_works(self, world: Sessions) -> None:
        """After a rotation the digests carry the root's version ("1:..."); the tag is the part after it."""
        since = datetime.now(UTC) - timedelta(seconds=1)
        world.digests.use_digest_roots({0: (os.urandom(32), None), 1: (os.urandom(32), since)})
        first = world.sign_in()
        assert world.refresh(first.refresh_token).session.id == first.session.id

    def test_a_replayed_refresh_token_revokes_the_session(
        self, world: Sessions, caplog: pytest.LogCaptureFixture
    ) -> None:
        first = world.sign_in()
        second = world.refresh(first.refresh_token)
        world.clock.advance(minutes=1)
        world.refused(first.refresh_token)  # used up: its owner or a thief brings it back
        assert world.sessions.records[first.session.id].revoked_at == world.clock.now()
        world.refused(second.refresh_token)  # so the current token dies with the session
        extra = logged(caplog, "refresh token replayed; session revoked")
        assert (extra["user_id"], extra["session_id"]) == (world.user.id, first.session.id)

    def test_a_forged_token_naming_a_real_session_is_refused_and_changes_nothing(
        self, world: Sessions, caplog: pytest.LogCaptureFixture
    ) -> None:
        issued = world.sign_in()
        session_id, generation, secret = issued.refresh_token.split(".")
        other = world.sign_in().refresh_token.split(".")[2]
        forgeries = [
            f"{session_id}.{generation}.{other}",  # another session's secret
            f"{session_id}.1.{secret}",  # a later generation
            f"{session_id}.{generation}.{secret[:-2]}{'A' if secret[-2] != 'A' else 'B'}{secret[-1]}",
        ]
        for forged in forgeries:
            world.refused(forged)
            run(world.session_service.revoke(forged))  # nor does sign-out with it end anything
        assert not world.revoked(session_id)
        assert world.refresh(issued.refresh_token).session.id == session_id
        forged_logs = [r for r in caplog.records if r.getMessage() == "forged refresh token refused"]
        assert len(forged_logs) == 2 * len(forgeries)
        assert {r.__dict__["session_id"] for r in forged_logs} == {session_id}

    def test_a_token_moved_to_another_session_is_refused(self, world: Sessions) -> None:
        mine, theirs = world.sign_in(), world.sign_in()
        _, generation, secret = mine.refresh_token.split(".")
        world.refused(f"{theirs.session.id}.{generation}.{secret}")
        assert not world.revoked(theirs.session.id)
        assert not world.revoked(mine.session.id)

    def test_an_expired_session_is_refused(self, world: Sessions) -> None:
        issued = world.sign_in()
        world.clock.advance(days=30)
        world.refused(issued.refresh_token)

    def test_a_revoked_session_is_refused(self, world: Sessions) -> None:
        issued = world.sign_in()
        run(world.session_service.revoke(issued.refresh_token))
        world.refused(issued.refresh_token)

    def test_a_session_older_than_the_users_token_version_is_refused(self, world: Sessions) -> None:
        """A session opened while a change that bumps the version was under way ends with it."""
        issued = world.sign_in()
        run(world.users.bump_token_version(world.user.id, world.clock.now()))
        world.refused(issued.refresh_token)

    def test_a_session_of_an_inactive_or_deleted_user_is_refused(self, world: Sessions) -> None:
        disabled, deleted = world.sign_in(), world.sign_in()
        account = world.users.accounts[world.user.id]
        world.users.accounts[world.user.id] = dataclasses.replace(
            account, user=dataclasses.replace(account.user, state=UserState.DEACTIVATED)
        )
        world.refused(disabled.refresh_token)
        world.users.accounts[world.user.id] = account
        run(world.users.delete(world.user.id))
        world.refused(deleted.refresh_token)


class TestRefreshTokenForm:
    @pytest.mark.parametrize(("token", "description"), [("", "is required"), ("x" * 129, "is not a refresh token")])
    def test_an_empty_or_overlong_token_is_invalid_argument(
        self, world: Sessions, token: str, description: str
    ) -> None:
        with pytest.raises(InvalidArgument) as error:
            world.refresh(token)
        assert [(v.field, v.description) for v in error.value.violations] == [("refresh_token", description)]

    def test_a_token_of_128_characters_is_judged_not_rejected_as_too_long(self, world: Sessions) -> None:
        world.refused("x" * 128)

    def test_tokens_of_the_earlier_format_are_refused(self, world: Sessions) -> None:
        world.refused("d" * 64)

    @pytest.mark.parametrize(
        "spelling",
        [
            "{sid}.{gen}.{secret}.",  # four parts
            "{sid}{gen}.{secret}",  # two
            "{SID}.{gen}.{secret}",  # not an id
            "{sid}.0{gen}.{secret}",  # a leading zero
            "{sid}.{gen}.{secret}=",  # padded
            "{sid}.{gen}.{secret}A",  # longer
            "{sid}.{gen}.{secret}!",  # not base64
            "{sid}.{gen}.{short}",  # shorter
            "{sid}.\u0660.{secret}",  # an Arabic-Indic zero: a digit, not ASCII
            "{sid}.-0.{secret}",
            "{sid}. 0.{secret}",
        ],
    )
    def test_a_misspelt_genuine_token_is_refused_and_changes_nothing(self, world: Sessions, spelling: str) -> None:
        issued = world.sign_in()
        session_id, generation, secret = issued.refresh_token.split(".")
        token = spelling.format(
            sid=session_id, SID=session_id.upper(), gen=generation, secret=secret, short=secret[:-1]
        )
        world.refused(token)
        run(world.session_service.revoke(token))
        assert not world.revoked(session_id)
        assert world.refresh(issued.refresh_token).session.id == session_id

    def test_a_secret_with_other_trailing_bits_is_refused(self, world: Sessions) -> None:
        """43 base64 characters hold 258 bits: the last two bits must be zero, so one token has one spelling."""
        issued = world.sign_in()
        session_id, generation, secret = issued.refresh_token.split(".")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        twin = secret[:-1] + alphabet[alphabet.index(secret[-1]) + 1]  # same bytes, a trailing bit set
        world.refused(f"{session_id}.{generation}.{twin}")
        assert not world.revoked(session_id)

    def test_generations_stop_at_ten_to_the_fifteenth(self, world: Sessions) -> None:
        issued = world.sign_in()
        session_id = issued.session.id
        run(world.session_service.revoke(world.mint(session_id, 10**15 + 1)))
        assert not world.revoked(session_id)
        run(world.session_service.revoke(world.mint(session_id, 10**15)))
        assert world.revoked(session_id)


class TestSignOut:
    def test_any_token_the_session_issued_ends_it(self, world: Sessions, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO)
        first = world.sign_in()
        world.refresh(first.refresh_token)
        world.clock.advance(minutes=1)
        run(world.session_service.revoke(first.refresh_token))
        assert world.sessions.records[first.session.id].revoked_at == world.clock.now()
        assert logged(caplog, "session revoked")["session_id"] == first.session.id

    def test_a_token_of_nothing_changes_nothing(self, world: Sessions) -> None:
        issued = world.sign_in()
        run(world.session_service.revoke("0" * 24 + ".0." + "A" * 43))
        assert not world.revoked(issued.session.id)
        with pytest.raises(InvalidArgument):
            run(world.session_service.revoke(""))

    def test_sessions_are_listed_newest_first_without_the_ended_ones(self, world: Sessions) -> None:
        old = world.sign_in()
        world.clock.advance(minutes=1)
        ended = world.sign_in()
        world.clock.advance(minutes=1)
        new = world.sign_in()
        run(world.session_service.revoke(ended.refresh_token))
        listed = run(world.session_service.list_sessions(world.user.id))
        assert [s.id for s in listed] == [new.session.id, old.session.id]
        world.clock.advance(days=30, seconds=-90)
        assert [s.id for s in run(world.session_service.list_sessions(world.user.id))] == [new.session.id]
        with pytest.raises(InvalidArgument) as error:
            run(world.session_service.list_sessions("not an id"))
        assert [v.field for v in error.value.violations] == ["user_id"]

    def test_signing_out_everywhere_ends_every_session_and_access_token(
        self, world: Sessions, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        first, second = world.sign_in(), world.sign_in()
        world.clock.advance(minutes=1)
        run(world.session_service.revoke_all(world.user.id))
        assert world.users.accounts[world.user.id].user.token_version == 1
        assert world.users.accounts[world.user.id].user.updated_at == world.clock.now()
        for issued in (first, second):
            assert world.sessions.records[issued.session.id].revoked_at == world.clock.now()
            with pytest.raises(Unauthenticated, match=r"^access token revoked$"):
                run(world.session_service.validate(issued.access_token))
        assert logged(caplog, "all sessions revoked")["user_id"] == world.user.id
        with pytest.raises(InvalidArgument) as error:
            run(world.session_service.revoke_all("not an id"))
        assert [v.field for v in error.value.violations] == ["user_id"]


class TestAccessTokens:
    def test_an_access_token_speaks_for_an_active_user_at_its_version(self, world: Sessions) -> None:
        issued = world.sign_in()
        claims, user = run(world.session_service.check_access_token(issued.access_token))
        assert (claims.subject, user.id) == (world.user.id, world.user.id)

    def test_an_access_token_of_a_changed_inactive_or_deleted_user_is_refused(self, world: Sessions) -> None:
        issued = world.sign_in()
        account = world.users.accounts[world.user.id]
        for changed in (
            dataclasses.replace(account.user, token_version=1),
            dataclasses.replace(account.user, state=UserState.DEACTIVATED),
        ):
            world.users.accounts[world.user.id] = dataclasses.replace(account, user=changed)
            with pytest.raises(Unauthenticated, match=r"^access token revoked$"):
                run(world.session_service.check_access_token(issued.access_token))
        run(world.users.delete(world.user.id))
        with pytest.raises(Unauthenticated, match=r"^access token revoked$"):
            run(world.session_service.check_access_token(issued.access_token))

    def test_an_expired_access_token_is_refused(self, world: Sessions) -> None:
        issued = world.sign_in()
        world.clock.advance(minutes=15)
        with pytest.raises(Unauthenticated, match="expired"):
            run(world.session_service.validate(issued.access_token))

    def test_validate_wants_a_token(self, world: Sessions) -> None:
        with pytest.raises(InvalidArgument) as error:
            run(world.session_service.validate(""))
        assert [(v.field, v.description) for v in error.value.violations] == [("access_token", "is required")]

    def test_the_public_keys_are_the_signing_keys(self, world: Sessions) -> None:
        assert world.session_service.public_keys() == world.tokens.jwks()
        assert len(world.session_service.public_keys()["keys"]) == 1
