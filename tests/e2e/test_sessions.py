"""Sessions and tokens through the real server: sign-in, rotation, replay, revocation,
verification by an independent JOSE library, and every way a forged token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import bson
import grpc
import jwt
import pytest
from bson import ObjectId
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from pymongo import MongoClient

from tests.support.calls import (
    PASSWORD,
    create_request,
    get_user_status,
    refresh,
    refresh_status,
    rpc_error,
    signed_up,
    violated_fields,
)
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import ADMIN_PASSWORD, KEY_ENCRYPTION_KEY, RunningServer, StartServer, registration
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.services.tokens import KeyEncryption

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def whoami(server: RunningServer, session: pb.AuthenticateResponse, token: str | None = None) -> user_pb2.User:
    """GetUser on the session's own user, with the session's access token or another."""
    stub = server.stub_for(token if token is not None else session.access_token)
    return stub.GetUser(pb.GetUserRequest(id=session.user.id)).user


def signing_key(server: RunningServer, mongodb_uri: str) -> tuple[str, Any]:
    """The server's current signing key, read as an insider would, to forge otherwise-valid tokens."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        stored = max(client[server.settings.mongodb_database].signing_keys.find(), key=lambda k: k["created_at"])
    private = KeyEncryption(KEY_ENCRYPTION_KEY).open(bytes(stored["sealed_private_key"]), stored["_id"])
    return stored["_id"], serialization.load_der_private_key(private, None)


def test_access_token_verifies_with_an_independent_library_and_the_jwks(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    jwks = json.loads(server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json)
    assert all("d" not in key for key in jwks["keys"]), "private key material in the JWKS"
    token = jose_jwt.decode(session.access_token, KeySet.import_key_set(jwks), algorithms=["ES256"])
    assert token.header["typ"] == "at+jwt"
    assert token.header["kid"] in {key["kid"] for key in jwks["keys"]}
    claims = token.claims
    assert claims["sub"] == session.user.id
    assert claims["iss"] == server.settings.jwt_issuer
    assert claims["aud"] == server.settings.jwt_audience
    assert claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == server.settings.access_token_ttl_seconds
    assert set(claims) >= {"iss", "aud", "sub", "exp", "iat", "jti"}
    assert session.access_token_expires_at.seconds == claims["exp"]
    assert whoami(server, session).username == "jane"


def test_authenticate_fails_like_verify_credentials(server: RunningServer, mail: MailSink) -> None:
    signed_up(server, mail)
    wrong = rpc_error(server.anonymous.Authenticate, pb.AuthenticateRequest(identifier="jane", password="x" * 12))
    unknown = rpc_error(server.anonymous.Authenticate, pb.AuthenticateRequest(identifier="joe", password="x" * 12))
    assert (
        (wrong.code(), wrong.details())
        == (unknown.code(), unknown.details())
        == (UNAUTHENTICATED, "invalid credentials")
    )
    server.anonymous.CreateUser(create_request(username="idle", email="idle@example.com"))
    inactive = rpc_error(server.anonymous.Authenticate, pb.AuthenticateRequest(identifier="idle", password=PASSWORD))
    assert inactive.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_refresh_rotates_and_a_replayed_token_revokes_the_session(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    second = refresh(server, session.refresh_token)
    assert second.refresh_token != session.refresh_token
    assert second.session_id == session.session_id
    assert whoami(server, session, second.access_token).id == session.user.id
    # RT1 again: a thief or a replay. The whole session dies, RT2 included.
    assert refresh_status(server, session.refresh_token) == UNAUTHENTICATED
    assert refresh_status(server, second.refresh_token) == UNAUTHENTICATED


def test_parallel_refreshes_with_one_token_succeed_once(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    request = pb.RefreshSessionRequest(refresh_token=session.refresh_token)
    futures = [server.anonymous.RefreshSession.future(request) for _ in range(8)]
    assert sum(f.exception(timeout=60) is None for f in futures) == 1


def test_session_has_an_absolute_lifetime(start_server: StartServer, mail: MailSink) -> None:
    clock = FakeClock(start=FakeClock().now().replace(year=2026))
    server = start_server(clock=clock)
    session = signed_up(server, mail)
    clock.advance(seconds=server.settings.session_ttl_seconds - 60)
    later = refresh(server, session.refresh_token)
    assert later.refresh_token_expires_at == session.refresh_token_expires_at
    clock.advance(seconds=61)
    assert refresh_status(server, later.refresh_token) == UNAUTHENTICATED


def test_revoke_session_signs_out(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    server.anonymous.RevokeSession(pb.RevokeSessionRequest(refresh_token=session.refresh_token))
    assert refresh_status(server, session.refresh_token) == UNAUTHENTICATED
    server.anonymous.RevokeSession(pb.RevokeSessionRequest(refresh_token="never-issued"))  # not an error


def test_revoke_all_sessions_kills_refresh_and_access_tokens_at_once(server: RunningServer, mail: MailSink) -> None:
    first = signed_up(server, mail)
    second = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    own = server.stub_for(first.access_token)
    listed = own.ListSessions(pb.ListSessionsRequest(user_id=first.user.id)).sessions
    assert {s.id for s in listed} == {first.session_id, second.session_id}

    own.RevokeAllSessions(pb.RevokeAllSessionsRequest(user_id=first.user.id))
    for token in (first.access_token, second.access_token):
        assert get_user_status(server, token, first.user.id) == UNAUTHENTICATED
    for session in (first, second):
        request = pb.RefreshSessionRequest(refresh_token=session.refresh_token)
        assert rpc_error(server.anonymous.RefreshSession, request).code() == UNAUTHENTICATED
    assert server.stub.ListSessions(pb.ListSessionsRequest(user_id=first.user.id)).sessions == []
    # Signing in again works, with tokens of the new version.
    third = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    assert whoami(server, third).id == first.user.id


def test_deleted_user_tokens_stop_working(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    server.stub_for(session.access_token).DeleteUser(pb.DeleteUserRequest(id=session.user.id, password=PASSWORD))
    assert get_user_status(server, session.access_token, session.user.id) == UNAUTHENTICATED
    assert refresh_status(server, session.refresh_token) == UNAUTHENTICATED


def test_a_stolen_access_token_alone_cannot_delete_the_account(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    stolen = server.stub_for(session.access_token)
    missing = rpc_error(stolen.DeleteUser, pb.DeleteUserRequest(id=session.user.id))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(missing) == {"password"}
    guessed = rpc_error(stolen.DeleteUser, pb.DeleteUserRequest(id=session.user.id, password="a guessed password"))
    assert guessed.code() == UNAUTHENTICATED
    assert whoami(server, session).id == session.user.id
    stolen.DeleteUser(pb.DeleteUserRequest(id=session.user.id, password=PASSWORD))
    assert rpc_error(server.stub.GetUser, pb.GetUserRequest(id=session.user.id)).code() == grpc.StatusCode.NOT_FOUND


def test_an_admin_deletes_another_user_without_a_password_but_themself_with_one(
    server: RunningServer, mail: MailSink
) -> None:
    session = signed_up(server, mail)
    server.stub.DeleteUser(pb.DeleteUserRequest(id=session.user.id))
    assert rpc_error(server.stub.GetUser, pb.GetUserRequest(id=session.user.id)).code() == grpc.StatusCode.NOT_FOUND
    missing = rpc_error(server.stub.DeleteUser, pb.DeleteUserRequest(id=server.admin_id))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    wrong = rpc_error(server.stub.DeleteUser, pb.DeleteUserRequest(id=server.admin_id, password="not the password"))
    assert wrong.code() == UNAUTHENTICATED
    # Another admin first: the last active admin is never deleted.
    server.call(server.app.services.accounts.create_admin(registration(username="second", email="second@example.com")))
    server.stub.DeleteUser(pb.DeleteUserRequest(id=server.admin_id, password=ADMIN_PASSWORD))
    assert rpc_error(server.stub.GetUser, pb.GetUserRequest(id=server.admin_id)).code() == UNAUTHENTICATED


def test_validate_token_returns_claims_and_refuses_revoked_tokens(server: RunningServer, mail: MailSink) -> None:
    session = signed_up(server, mail)
    claims = server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=session.access_token)).claims
    assert (claims.subject, claims.session_id, claims.role) == (session.user.id, session.session_id, user_pb2.ROLE_USER)
    server.stub.RevokeAllSessions(pb.RevokeAllSessionsRequest(user_id=session.user.id))
    error = rpc_error(server.stub.ValidateToken, pb.ValidateTokenRequest(access_token=session.access_token))
    assert error.code() == UNAUTHENTICATED


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# The order n of the P-256 group: (r, s) and (r, n - s) are both valid ECDSA signatures.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _with_s(token: str, choose: Any) -> str:
    """The token with the s of its signature (raw r || s, RFC 7518 3.4) replaced by choose(s)."""
    signing_input, _, encoded = token.rpartition(".")
    raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    s = choose(int.from_bytes(raw[32:], "big"))
    return f"{signing_input}.{_b64(raw[:32] + s.to_bytes(32, 'big'))}"


def low_s(token: str) -> str:
    return _with_s(token, lambda s: min(s, P256_ORDER - s))


def test_the_twin_of_a_tokens_signature_is_unauthenticated(server: RunningServer, mail: MailSink) -> None:
    """(r, n - s) verifies as well as (r, s): a second spelling of the same token, which a
    deny-list keyed on the token's text would miss. Only the low s is accepted, and the server
    signs with it, so its own tokens always pass."""
    session = signed_up(server, mail)
    twin = _with_s(session.access_token, lambda s: P256_ORDER - s)
    assert twin != session.access_token
    assert get_user_status(server, twin, session.user.id) == UNAUTHENTICATED
    assert whoami(server, session).id == session.user.id
    for _ in range(20):  # every token it issues passes (a high s, refused, comes half the time)
        renewed = refresh(server, session.refresh_token)
        session.refresh_token = renewed.refresh_token
        assert whoami(server, session, renewed.access_token).id == session.user.id


def _claims(server: RunningServer, session: pb.AuthenticateResponse, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": server.settings.jwt_issuer,
        "aud": server.settings.jwt_audience,
        "sub": session.user.id,
        "iat": now,
        "exp": now + 600,
        "jti": "forged",
        "role": "user",
        "ver": 0,
        "sid": session.session_id,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


FORGERIES = [
    "alg-none",
    "alg-nOnE",
    "hs256-with-the-public-key",
    "wrong-aud",
    "wrong-iss",
    "expired",
    "missing-exp",
    "missing-jti",
    "unknown-kid",
    "foreign-key-via-jku",
    "refresh-token-as-access-token",
    "tampered-payload",
    "wrong-typ",
    "admin-role-claim-for-a-user",
    "subject-not-a-user-id",
    "subject-not-a-string",
]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_tokens_are_unauthenticated(
    server: RunningServer, mail: MailSink, mongodb_uri: str, forgery: str
) -> None:
    session = signed_up(server, mail)
    kid, key = signing_key(server, mongodb_uri)
    header = {"kid": kid, "typ": "at+jwt"}

    def sign(claims: dict[str, Any], headers: dict[str, Any] = header, signer: Any = key) -> str:
        # Low s, as the server signs: each forgery is refused for what it forges, not for a high s.
        return low_s(jwt.encode(claims, signer, algorithm="ES256", headers=headers))

    if forgery.startswith("alg-"):
        alg = forgery.removeprefix("alg-")
        head = _b64(json.dumps({"alg": alg, "typ": "at+jwt", "kid": kid}).encode())
        token = f"{head}.{_b64(json.dumps(_claims(server, session)).encode())}."
    elif forgery == "hs256-with-the-public-key":
        jwks = json.loads(server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json)
        public = json.dumps(next(k for k in jwks["keys"] if k["kid"] == kid)).encode()
        head = _b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
        body = _b64(json.dumps(_claims(server, session)).encode())
        signature = _b64(hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest())
        token = f"{head}.{body}.{signature}"
    elif forgery == "wrong-aud":
        token = sign(_claims(server, session, aud="someone-else"))
    elif forgery == "wrong-iss":
        token = sign(_claims(server, session, iss="https://evil.example"))
    elif forgery == "expired":
        token = sign(_claims(server, session, iat=int(time.time()) - 1000, exp=int(time.time()) - 10))
    elif forgery == "missing-exp":
        token = sign(_claims(server, session, exp=None))
    elif forgery == "missing-jti":
        token = sign(_claims(server, session, jti=None))
    elif forgery == "unknown-kid":
        token = sign(
            _claims(server, session), {"kid": "not-a-key", "typ": "at+jwt"}, ec.generate_private_key(ec.SECP256R1())
        )
    elif forgery == "foreign-key-via-jku":
        attacker = ec.generate_private_key(ec.SECP256R1())
        headers = {"kid": "attacker", "typ": "at+jwt", "jku": "https://evil.example/jwks.json"}
        token = sign(_claims(server, session), headers, attacker)
    elif forgery == "refresh-token-as-access-token":
        token = session.refresh_token
    elif forgery == "tampered-payload":
        head, body, signature = session.access_token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims["role"] = "admin"
        token = f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"
    elif forgery == "subject-not-a-user-id":
        # Signed with the server's own key, as a bug or a leaked key could: still no INTERNAL.
        token = sign(_claims(server, session, sub="not-an-object-id"))
    elif forgery == "subject-not-a-string":
        token = sign(_claims(server, session, sub=12345))
    elif forgery == "wrong-typ":
        token = sign(_claims(server, session), {"kid": kid, "typ": "JWT"})
    elif forgery == "admin-role-claim-for-a-user":
        # Even a validly signed claim of a role the user does not have grants nothing beyond the user's own.
        token = sign(_claims(server, session, role="admin"))
        admin_only = server.stub_for(token).DeleteUserByIdentifier
        assert (
            rpc_error(admin_only, pb.DeleteUserByIdentifierRequest(identifier="someone")).code()
            == grpc.StatusCode.PERMISSION_DENIED
        )
        return
    else:
        raise AssertionError(forgery)
    assert get_user_status(server, token, session.user.id) == UNAUTHENTICATED


def test_rotation_keeps_old_tokens_valid_and_signs_with_the_new_key(server: RunningServer, mail: MailSink) -> None:
    before = signed_up(server, mail)
    old_kid = jwt.get_unverified_header(before.access_token)["kid"]
    new_kid = server.call(server.app.services.tokens.rotate())
    after = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    assert jwt.get_unverified_header(after.access_token)["kid"] == new_kid != old_kid
    assert whoami(server, before).id == whoami(server, after).id
    jwks = json.loads(server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json)
    assert {key["kid"] for key in jwks["keys"]} == {old_kid, new_kid}
    assert server.call(server.app.services.tokens.retire(old_kid))
    assert get_user_status(server, before.access_token, before.user.id) == UNAUTHENTICATED


def test_a_token_version_bump_alone_ends_refresh_too(server: RunningServer, mail: MailSink) -> None:
    """A session opened while a password change was under way dies with the change's version bump,
    even if it escaped the change's sweep of sessions."""
    session = signed_up(server, mail)
    server.call(server.app.stores.users.bump_token_version(session.user.id, datetime.now(UTC)))
    assert refresh_status(server, session.refresh_token) == UNAUTHENTICATED


def _stored_session(server: RunningServer, mongodb_uri: str, session_id: str) -> dict[str, Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        stored = client[server.settings.mongodb_database].sessions.find_one({"_id": ObjectId(session_id)})
    assert stored is not None
    return stored


def test_a_session_keeps_its_size_however_often_it_is_refreshed(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    """Replay detection keeps no list of used tokens: 300 refreshes leave the session as large as one."""
    session = signed_up(server, mail)
    token = refresh(server, session.refresh_token).refresh_token
    size = len(bson.encode(_stored_session(server, mongodb_uri, session.session_id)))
    for _ in range(300):
        token = refresh(server, token).refresh_token
    stored = _stored_session(server, mongodb_uri, session.session_id)
    assert len(bson.encode(stored)) == size
    assert stored["generation"] == 301
    assert "used_digests" not in stored


def test_an_old_token_ends_its_session_but_a_forged_one_naming_it_does_not(
    server: RunningServer, mail: MailSink
) -> None:
    """Session ids are no secret (ListSessions, the access token's sid): a stranger who knows one
    cannot end the session with a made-up token, while a real used-up token still ends it."""
    session = signed_up(server, mail)
    other = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    session_id = jwt.decode(session.access_token, options={"verify_signature": False})["sid"]
    assert session_id == session.session_id
    current = refresh(server, session.refresh_token).refresh_token
    _, generation, secret = current.split(".")
    forgeries = [
        f"{session_id}.{generation}.{_b64(secrets.token_bytes(32))}",  # the current generation
        f"{session_id}.0.{_b64(secrets.token_bytes(32))}",  # an old generation
        f"{session_id}.0.{other.refresh_token.split('.')[2]}",  # a real secret of another session
        f"{session_id}.{int(generation) + 1}.{secret}",  # a real secret under another generation
        f"{other.session_id}.{generation}.{secret}",  # a real secret under another session
    ]
    for forged in forgeries:
        assert refresh_status(server, forged) == UNAUTHENTICATED
        server.anonymous.RevokeSession(pb.RevokeSessionRequest(refresh_token=forged))  # not an error; no effect
    # Both sessions live on.
    current = refresh(server, current).refresh_token
    other_current = refresh(server, other.refresh_token).refresh_token
    # The first session's own used-up token is a replay: the session ends, the other does not.
    assert refresh_status(server, session.refresh_token) == UNAUTHENTICATED
    assert refresh_status(server, current) == UNAUTHENTICATED
    assert refresh(server, other_current).session_id == other.session_id


def test_refresh_tokens_of_the_earlier_format_are_unauthenticated(server: RunningServer, mail: MailSink) -> None:
    """Tokens without the session and generation (the format before) are simply refused."""
    session = signed_up(server, mail)
    for token in (secrets.token_urlsafe(32), f"{session.session_id}.x.y", "a.b.c.d", f"{session.session_id}..x"):
        assert refresh_status(server, token) == UNAUTHENTICATED
    assert refresh(server, session.refresh_token).session_id == session.session_id


def test_revoke_session_takes_any_token_the_session_issued(server: RunningServer, mail: MailSink) -> None:
    """A client that lost a refresh reply still holds its previous token: that one signs out too."""
    session = signed_up(server, mail)
    current = refresh(server, session.refresh_token).refresh_token
    server.anonymous.RevokeSession(pb.RevokeSessionRequest(refresh_token=session.refresh_token))
    assert refresh_status(server, current) == UNAUTHENTICATED
