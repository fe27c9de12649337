"""Access tokens and signing keys on a fake key store: what a token must be to be accepted."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import types
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.support.fakes import FakeClock, FakeKeyStore
from tests.support.logs import logged
from users_grpc.domain.errors import ConfigError, Unauthenticated
from users_grpc.domain.model import Gender, Role, StoredKey, User, UserState
from users_grpc.services import tokens as tokens_module
from users_grpc.services.tokens import (
    ACCESS_TOKEN_TYPE,
    ALGORITHM,
    AccessTokens,
    KeyEncryption,
    is_service_token,
    new_key_encryption_key,
)

_T = TypeVar("_T")
ISSUER = "https://users.example.com"
AUDIENCE = "users-api"
USER = User(
    id="a" * 24,
    username="jane",
    first_name="Jane",
    last_name="Doe",
    email="jane@example.com",
    gender=Gender.FEMALE,
    role=Role.ADMIN,
    state=UserState.ACTIVE,
    created_at=datetime(2025, 1, 1, tzinfo=UTC),
    updated_at=datetime(2025, 1, 1, tzinfo=UTC),
    token_version=7,
)
SESSION_ID = "5" * 24
UNOPENABLE = (
    "USERS_KEY_ENCRYPTION_KEY does not open the signing keys stored in the database, "
    "nor does any key in USERS_OLD_KEY_ENCRYPTION_KEYS: it is not the key they were sealed "
    "with; use the key this database was set up with (or, mid-rotation, list that one as old)"
)
CLIENT = "c" * 24


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def signature_of(token: str) -> tuple[int, int]:
    encoded = token.rpartition(".")[2]
    raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    assert len(raw) == 64
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")


def with_signature(token: str, r: int, s: int) -> str:
    return f"{token.rpartition('.')[0]}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


class Keys:
    """An AccessTokens over a fake key store, with a monotonic clock the test moves."""

    def __init__(self, store: FakeKeyStore | None = None, kek: bytes | None = None) -> None:
        self.store = store or FakeKeyStore()
        self.kek = kek or os.urandom(32)
        self.clock = FakeClock(datetime(2026, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC))
        self.tokens = AccessTokens(
            store=self.store,
            encryption=KeyEncryption(self.kek),
            clock=self.clock,
            issuer=ISSUER,
            audience=AUDIENCE,
            lifetime=timedelta(minutes=15),
        )

    def private_key(self, kid: str) -> ec.EllipticCurvePrivateKey:
        opened = KeyEncryption(self.kek).open(self.store.keys[kid].sealed_private_key, kid)
        key = serialization.load_der_private_key(opened, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def forge(self, claims: dict[str, Any], **headers: Any) -> str:
        """A token signed with the current signing key, with the claims and headers given (None drops one).

        Made by hand: PyJWT would refuse to write some of the headers a forger can."""
        kid = self.tokens.signing_kid
        assert kid is not None
        header = {"alg": ALGORITHM, "kid": kid, "typ": ACCESS_TOKEN_TYPE, **headers}
        signing_input = ".".join(
            _b64(json.dumps({k: v for k, v in part.items() if v is not None}).encode()) for part in (header, claims)
        )
        signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), self.private_key(kid))
        # With the low s of the two valid ones, as we sign: a high s is refused before anything else.
        r, s = signature_of(f"{signing_input}.{_b64(signature)}")
        return with_signature(f"{signing_input}.", r, min(s, P256_ORDER - s))

    def user_claims(self, **changes: Any) -> dict[str, Any]:
        now = int(self.clock.now().timestamp())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": USER.id,
            "iat": now,
            "exp": now + 60,
            "jti": "j" * 32,
            "role": "user",
            "ver": 0,
            "sid": SESSION_ID,
        }
        claims.update(changes)
        return {key: value for key, value in claims.items() if value is not None}


@pytest.fixture
def keys() -> Keys:
    keys = Keys()
    run(keys.tokens.ensure_signing_key())
    return keys


REFUSALS = {
    "expired": "access token expired",
    "unknown key": "access token signed by an unknown key",
    "not an access token": "not an access token",
    "invalid access token": "invalid access token",
    "malformed": "malformed access token",
}


def refused(keys: Keys, token: str, why: str = "") -> str:
    """The token is refused, saying why (one of REFUSALS; the one named, if any)."""
    with pytest.raises(Unauthenticated) as error:
        run(keys.tokens.verify(token))
    assert str(error.value) == REFUSALS[why] if why else str(error.value) in REFUSALS.values()
    return str(error.value)


class TestUserTokens:
    def test_an_issued_token_says_who_what_and_until_when(self, keys: Keys) -> None:
        token, expires_at = keys.tokens.issue(USER, SESSION_ID)
        claims = run(keys.tokens.verify(token))
        assert (claims.subject, claims.role, claims.token_version, claims.session_id) == (
            USER.id,
            Role.ADMIN,
            7,
            SESSION_ID,
        )
        assert (claims.issuer, claims.audience) == (ISSUER, AUDIENCE)
        # Whole seconds, as the token carries them: the expiry stated is the one enforced.
        assert claims.issued_at == datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
        assert expires_at == claims.expires_at == datetime(2026, 1, 1, 12, 15, 0, tzinfo=UTC)
        header = jwt.get_unverified_header(token)
        assert header == {"alg": "ES256", "kid": keys.tokens.signing_kid, "typ": "at+jwt"}
        assert len(claims.token_id) == 32

    def test_every_token_has_its_own_id(self, keys: Keys) -> None:
        first = run(keys.tokens.verify(keys.tokens.issue(USER, SESSION_ID)[0]))
        second = run(keys.tokens.verify(keys.tokens.issue(USER, SESSION_ID)[0]))
        assert first.token_id != second.token_id

    def test_a_token_is_accepted_until_its_expiry_and_refused_from_then_on(self, keys: Keys) -> None:
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        keys.clock.advance(minutes=14, seconds=59)
        run(keys.tokens.verify(token))  # now cached: the expiry holds on the cached path too
        keys.clock.advance(seconds=0.5)
        refused(keys, token, "expired")
        refused(keys, token, "expired")  # and on the checked path, once dropped from the cache

    def test_an_expired_token_never_seen_before_is_refused(self, keys: Keys) -> None:
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        keys.clock.advance(minutes=15)
        refused(keys, token, "expired")

    @pytest.mark.parametrize("year", [2001, 2100])
    def test_the_services_clock_decides_expiry_not_the_wall_clock(self, keys: Keys, year: int) -> None:
        keys.clock.current = datetime(year, 1, 1, tzinfo=UTC)
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        assert run(keys.tokens.verify(token)).subject == USER.id

    @pytest.mark.parametrize(
        ("changes", "headers"),
        [
            ({"iss": "https://evil.example.com"}, {}),
            ({"aud": "another-api"}, {}),
            ({"aud": AUDIENCE + ":service-accounts"}, {}),
            ({"role": None}, {}),
            ({"role": "root"}, {}),
            ({"ver": None}, {}),
            ({"ver": "7"}, {}),
            ({"sid": None}, {}),
            ({"sid": 5}, {}),
            ({"sub": "service-account:" + CLIENT}, {}),
            ({"jti": None}, {}),
            ({"iat": None}, {}),
            ({"exp": None}, {}),
            ({"exp": "tomorrow"}, {}),
            ({"exp": 10**20}, {}),
            ({}, {"typ": "JWT"}),
            ({}, {"kid": None}),
            ({}, {"kid": 1}),
            ({}, {"kid": "unknown"}),
        ],
    )
    def test_a_token_of_ours_with_a_wrong_claim_or_header_is_refused(
        self, keys: Keys, changes: dict[str, Any], headers: dict[str, Any]
    ) -> None:
        run(keys.tokens.verify(keys.forge(keys.user_claims())))  # the same token, unchanged, passes
        refused(keys, keys.forge(keys.user_claims(**changes), **headers))

    def test_another_algorithm_is_refused(self, keys: Keys) -> None:
        token = jwt.encode(
            keys.user_claims(),
            "a shared secret of thirty-two bytes or more",
            algorithm="HS256",
            headers={"kid": keys.tokens.signing_kid, "typ": ACCESS_TOKEN_TYPE},
        )
        refused(keys, token, "not an access token")

    def test_a_token_signed_by_a_key_not_ours_is_refused(self, keys: Keys) -> None:
        stranger = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(
            keys.user_claims(),
            stranger,
            algorithm=ALGORITHM,
            headers={"kid": keys.tokens.signing_kid, "typ": ACCESS_TOKEN_TYPE},
        )
        refused(keys, token, "invalid access token")

    @pytest.mark.parametrize("token", ["", "abc", "a.b.c", "not a token at all"])
    def test_garbage_is_refused(self, keys: Keys, token: str) -> None:
        refused(keys, token, "malformed")

    def test_a_changed_claim_breaks_the_signature(self, keys: Keys) -> None:
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["role"] = "admin"
        claims["sub"] = "b" * 24
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        refused(keys, f"{header}.{forged}.{signature}", "invalid access token")


class TestVerificationCache:
    @staticmethod
    def count_signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
        checked: list[str] = []
        decode = jwt.decode

        def counting(token: str, *args: Any, **kwargs: Any) -> Any:
            checked.append(token)
            return decode(token, *args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting)
        return checked

    def test_a_token_checked_once_is_not_checked_again(self, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
        checked = self.count_signature_checks(monkeypatch)
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        first = run(keys.tokens.verify(token))
        assert run(keys.tokens.verify(token)) == first
        assert checked == [token]

    def test_the_cache_keeps_the_most_recently_used_tokens(self, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(tokens_module, "VERIFIED_CACHE_SIZE", 2)
        checked = self.count_signature_checks(monkeypatch)
        a, b, c = (keys.tokens.issue(USER, SESSION_ID)[0] for _ in range(3))
        for token in (a, b, a, c):  # a used again after b: b is the least recently used when c comes
            run(keys.tokens.verify(token))
        run(keys.tokens.verify(a))
        run(keys.tokens.verify(c))
        assert checked == [a, b, c]
        run(keys.tokens.verify(b))
        assert checked == [a, b, c, b]

    def test_a_cached_user_token_is_no_service_token_and_back(self, keys: Keys) -> None:
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        run(keys.tokens.verify(token))
        with pytest.raises(Unauthenticated):
            run(keys.tokens.verify_service(token))
        service, _ = keys.tokens.issue_service(CLIENT)
        assert run(keys.tokens.verify_service(service)) == CLIENT
        refused(keys, service)

    def test_a_retired_key_is_refused_even_for_a_cached_token(self, keys: Keys) -> None:
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        old = keys.tokens.signing_kid
        run(keys.tokens.verify(token))
        run(keys.tokens.rotate())
        assert run(keys.tokens.retire(str(old))) is True
        refused(keys, token, "unknown key")

    def test_a_token_cached_for_one_audience_is_refused_for_the_other(self, keys: Keys) -> None:
        """The cache is keyed by the token's bytes alone, so a hit must match the audience it was
        checked for. Two tokens signed by our key, each for one audience with the other kind's
        claims: each is checked (and cached) where its audience fits, refused there for its claims,
        then refused on the other path too, for its audience, not answered from the cache."""
        service_audience = AUDIENCE + ":service-accounts"
        users_claims = keys.forge(keys.user_claims(aud=service_audience))
        with pytest.raises(Unauthenticated, match=r"^invalid access token$"):
            run(keys.tokens.verify_service(users_claims))
        refused(keys, users_claims, "invalid access token")

        services_claims = keys.forge(keys.user_claims(sub="service-account:" + CLIENT, role=None, ver=None, sid=None))
        refused(keys, services_claims, "invalid access token")
        with pytest.raises(Unauthenticated, match=r"^invalid access token$"):
            run(keys.tokens.verify_service(services_claims))


class TestServiceTokens:
    def test_a_service_token_names_its_client_and_nothing_else(self, keys: Keys) -> None:
        token, expires_at = keys.tokens.issue_service(CLIENT)
        assert run(keys.tokens.verify_service(token)) == CLIENT
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == "service-account:" + CLIENT
        assert claims["aud"] == AUDIENCE + ":service-accounts"
        assert not {"role", "ver", "sid"} & claims.keys()
        assert expires_at == datetime(2026, 1, 1, 12, 15, tzinfo=UTC)
        assert is_service_token(token)

    @pytest.mark.parametrize(
        "changes",
        [
            {"sub": CLIENT},
            {"sub": "service-account:"},
            {"sub": "service-account:bad id!"},
            {"sub": 5},
            {"role": "admin"},
            {"ver": 0},
            {"sid": SESSION_ID},
            {"aud": AUDIENCE},
        ],
    )
    def test_a_service_token_with_a_users_claims_is_refused(self, keys: Keys, changes: dict[str, Any]) -> None:
        base = {k: v for k, v in keys.user_claims().items() if k not in {"role", "ver", "sid"}}
        base.update(sub="service-account:" + CLIENT, aud=AUDIENCE + ":service-accounts")
        assert run(keys.tokens.verify_service(keys.forge(base))) == CLIENT
        base.update(changes)
        with pytest.raises(Unauthenticated, match=r"^invalid access token$"):
            run(keys.tokens.verify_service(keys.forge(base)))

    def test_an_expired_service_token_is_refused(self, keys: Keys) -> None:
        token, _ = keys.tokens.issue_service(CLIENT)
        keys.clock.advance(minutes=15)
        with pytest.raises(Unauthenticated, match="expired"):
            run(keys.tokens.verify_service(token))


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("x." + base64.urlsafe_b64encode(b'{"sub":"service-account:b"}').decode().rstrip("=") + ".y", True),
        ("x." + base64.urlsafe_b64encode(b'{"sub":"service-account:bc"}').decode().rstrip("=") + ".y", True),
        ("x." + base64.urlsafe_b64encode(b'{"sub":"aaaaaaaaaaaaaaaaaaaaaaaa"}').decode() + ".y", False),
        ("x." + base64.urlsafe_b64encode(b'{"sub":5}').decode() + ".y", False),
        ("x." + base64.urlsafe_b64encode(b'["service-account:b"]').decode() + ".y", False),
        ("x." + base64.urlsafe_b64encode(b'{"sub":"service-account:b"}').decode() + ".y.z", False),
        (base64.urlsafe_b64encode(b'{"sub":"service-account:b"}').decode() + ".y", False),
        ("x.!!!.y", False),
        ("x." + base64.urlsafe_b64encode(b"[" * 5000).decode() + ".y", False),
        ("x." + base64.urlsafe_b64encode(b"not json").decode() + ".y", False),
    ],
)
def test_is_service_token_reads_the_subject_only(token: str, expected: bool) -> None:
    assert is_service_token(token) is expected


@pytest.mark.parametrize("length", range(1, 9))
def test_is_service_token_reads_payloads_of_any_length(length: int) -> None:
    """Unpadded base64url of every length modulo 4."""
    payload = json.dumps({"sub": "service-account:" + "c" * length}).encode()
    assert is_service_token(f"x.{_b64(payload)}.y")


class TestSigningKeys:
    def test_the_first_start_makes_a_key_and_later_starts_reuse_it(self, log: pytest.LogCaptureFixture) -> None:
        keys = Keys()
        run(keys.tokens.ensure_signing_key())
        assert len(keys.store.keys) == 1
        logged(log, "signing key added", kid=keys.tokens.signing_kid)
        assert keys.tokens.signing_key_created_at == keys.clock.now()
        again = Keys(keys.store, keys.kek)
        run(again.tokens.ensure_signing_key())
        assert len(keys.store.keys) == 1
        assert again.tokens.signing_kid == keys.tokens.signing_kid

    def test_a_replica_that_never_loaded_the_keys_loads_them_at_the_first_token(self, keys: Keys) -> None:
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        fresh = Keys(keys.store, keys.kek)
        assert fresh.tokens.jwks() == {"keys": []}
        assert run(fresh.tokens.verify(token)).subject == USER.id

    def test_no_key_no_token(self) -> None:
        keys = Keys()
        assert keys.tokens.signing_kid is None
        assert keys.tokens.signing_key_created_at is None
        with pytest.raises(RuntimeError, match=r"^no signing key loaded$"):
            keys.tokens.issue(USER, SESSION_ID)

    def test_the_newest_live_key_signs_and_every_live_key_verifies(self, keys: Keys) -> None:
        first = keys.tokens.signing_kid
        old_token, _ = keys.tokens.issue(USER, SESSION_ID)
        keys.clock.advance(minutes=1)
        second = run(keys.tokens.rotate())
        assert keys.tokens.signing_kid == second != first
        assert keys.tokens.signing_key_created_at == keys.clock.now()
        # A key older than the newest, stored after it: the order of creation decides, not of storage.
        older = Keys(FakeKeyStore(), keys.kek)
        older.clock.current = keys.clock.now() - timedelta(hours=1)
        run(older.tokens.rotate())
        keys.store.keys.update(older.store.keys)
        run(keys.tokens.reload())
        assert keys.tokens.signing_kid == second
        assert run(keys.tokens.verify(old_token)).subject == USER.id
        new_token, _ = keys.tokens.issue(USER, SESSION_ID)
        assert jwt.get_unverified_header(new_token)["kid"] == second

    def test_a_retired_key_neither_signs_nor_verifies(self, keys: Keys) -> None:
        first = str(keys.tokens.signing_kid)
        old_token, _ = keys.tokens.issue(USER, SESSION_ID)
        keys.clock.advance(seconds=1)
        second = run(keys.tokens.rotate())
        assert run(keys.tokens.retire(second)) is True
        assert run(keys.tokens.retire(second)) is False
        assert run(keys.tokens.retire("no-such-key")) is False
        assert keys.tokens.signing_kid == first
        assert [key["kid"] for key in keys.tokens.jwks()["keys"]] == [first]
        run(keys.tokens.verify(old_token))
        assert run(keys.tokens.retire(first)) is True
        assert keys.tokens.jwks() == {"keys": []}
        assert keys.tokens.signing_key_created_at is None
        with pytest.raises(RuntimeError, match=r"^no signing key loaded$"):
            keys.tokens.issue(USER, SESSION_ID)
        refused(keys, old_token, "unknown key")

    def test_keys_sealed_under_another_kek_stop_the_start(self, keys: Keys) -> None:
        stranger = Keys(keys.store)
        with pytest.raises(ConfigError) as error:
            run(stranger.tokens.ensure_signing_key())
        assert str(error.value) == UNOPENABLE

    def test_an_unknown_kid_reloads_the_keys_at_most_every_five_seconds(
        self, keys: Keys, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monotonic = [1000.0]
        monkeypatch.setattr(tokens_module, "time", types.SimpleNamespace(monotonic=lambda: monotonic[0]))
        replica = Keys(keys.store, keys.kek)
        run(replica.tokens.reload())
        keys.clock.advance(seconds=1)
        run(keys.tokens.rotate())  # another replica's new key
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        monotonic[0] += 5
        refused(replica, token, "unknown key")  # reloaded five seconds ago: not yet
        monotonic[0] += 0.01
        assert run(replica.tokens.verify(token)).subject == USER.id

    def test_an_unknown_kid_with_unopenable_keys_is_refused_not_a_crash(
        self, keys: Keys, monkeypatch: pytest.MonkeyPatch, log: pytest.LogCaptureFixture
    ) -> None:
        monotonic = [1000.0]
        monkeypatch.setattr(tokens_module, "time", types.SimpleNamespace(monotonic=lambda: monotonic[0]))
        replica = Keys(keys.store, keys.kek)
        run(replica.tokens.reload())
        # A key sealed under another key-encryption key appears in the store.
        sealed = KeyEncryption(os.urandom(32)).seal(b"whatever", "kid-x")
        keys.store.keys["kid-x"] = StoredKey(kid="kid-x", sealed_private_key=sealed, created_at=keys.clock.now())
        monotonic[0] += 10
        log.clear()
        refused(replica, keys.forge(keys.user_claims(), kid="kid-x"), "unknown key")
        logged(log, "could not open the signing keys", cause=UNOPENABLE)

    def test_the_jwks_publishes_the_keys_that_verify_our_tokens(self, keys: Keys) -> None:
        keys.clock.advance(seconds=1)
        run(keys.tokens.rotate())
        jwks = keys.tokens.jwks()
        assert len(jwks["keys"]) == 2
        for published in jwks["keys"]:
            assert {k: published[k] for k in ("kty", "crv", "alg", "use")} == {
                "kty": "EC",
                "crv": "P-256",
                "alg": "ES256",
                "use": "sig",
            }
            assert len(published["x"]) == len(published["y"]) == 43  # 32 bytes, unpadded base64url
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        key = jwt.PyJWKSet.from_dict(jwks)[str(keys.tokens.signing_kid)]
        claims = jwt.decode(
            token, key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER, options={"verify_exp": False}
        )
        assert claims["sub"] == USER.id


class TestKeyEncryption:
    def test_sealed_opens_only_under_its_context(self) -> None:
        encryption = KeyEncryption(os.urandom(32))
        sealed = encryption.seal(b"secret", "kid-1")
        assert encryption.open(sealed, "kid-1") == b"secret"
        with pytest.raises(InvalidTag):
            encryption.open(sealed, "kid-2")
        assert encryption.seal(b"secret", "kid-1") != sealed  # a fresh nonce each time

    def test_old_keys_open_and_reseal_moves_to_the_current_key(self) -> None:
        old, new = os.urandom(32), os.urandom(32)
        sealed = KeyEncryption(old).seal(b"secret", "c")
        rotated = KeyEncryption(new, (old, new))
        assert rotated.current_key == new
        assert rotated.open(sealed, "c") == b"secret"
        assert rotated.opening_key(sealed, "c") == old
        resealed = rotated.reseal(sealed, "c")
        assert resealed is not None
        assert KeyEncryption(new).open(resealed, "c") == b"secret"
        assert rotated.opening_key(resealed, "c") == new
        assert rotated.reseal(resealed, "c") is None
        assert KeyEncryption(os.urandom(32)).opening_key(sealed, "c") is None
        with pytest.raises(InvalidTag):
            KeyEncryption(os.urandom(32)).reseal(sealed, "c")

    @pytest.mark.parametrize(("key", "old"), [(b"k" * 31, ()), (b"k" * 33, ()), (b"k" * 32, (b"k" * 16,))])
    def test_keys_must_be_32_bytes(self, key: bytes, old: tuple[bytes, ...]) -> None:
        with pytest.raises(ValueError, match=r"^the key-encryption key must be 32 bytes$"):
            KeyEncryption(key, old)

    def test_a_new_kek_is_32_fresh_bytes(self) -> None:
        first, second = new_key_encryption_key(), new_key_encryption_key()
        assert len(base64.urlsafe_b64decode(first)) == 32
        assert first != second
        KeyEncryption(base64.urlsafe_b64decode(first))


def test_every_token_we_sign_has_a_low_s_signature(keys: Keys) -> None:
    """ECDSA gives a high s about half the time: of 200 signatures, all low means we normalise
    (without it, all 200 low has a chance of 2^-200)."""
    for _ in range(200):
        token, _ = keys.tokens.issue(USER, SESSION_ID)
        _, s = signature_of(token)
        assert s <= P256_ORDER // 2
        assert run(keys.tokens.verify(token)).subject == USER.id


def test_the_high_s_twin_of_a_valid_signature_is_refused(keys: Keys) -> None:
    token, _ = keys.tokens.issue(USER, SESSION_ID)
    r, s = signature_of(token)
    twin = with_signature(token, r, P256_ORDER - s)
    # The twin is a valid ECDSA signature: a library that does not refuse high s accepts it.
    public = keys.private_key(keys.tokens.signing_kid or "").public_key()
    jwt.decode(twin, public, algorithms=[ALGORITHM], audience=AUDIENCE, options={"verify_exp": False})
    with pytest.raises(Unauthenticated, match=r"^invalid access token$"):
        run(keys.tokens.verify(twin))
    assert run(keys.tokens.verify(token)).subject == USER.id  # the original still works


def test_a_signature_spelt_another_way_is_refused(keys: Keys) -> None:
    """The last of 86 base64url characters carries 4 unused bits: sixteen spellings of one signature."""
    token, _ = keys.tokens.issue(USER, SESSION_ID)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    respelt = token[:-1] + alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(respelt.rpartition(".")[2] + "==") == base64.urlsafe_b64decode(
        token.rpartition(".")[2] + "=="
    )
    with pytest.raises(Unauthenticated):
        run(keys.tokens.verify(respelt))
    with pytest.raises(Unauthenticated):
        run(keys.tokens.verify(token + "="))
