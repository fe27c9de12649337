"""What a copy of the database reveals: no usable code or token, and no digest one could test a
guess against without the key-encryption key (finding 15 of issue 7).

Each test reads the raw database with a client of its own, after the secrets went out by mail or
in a reply, as an attacker with a stolen backup would.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from typing import Any

import grpc
from bson import ObjectId
from pymongo import MongoClient

from tests.support.calls import PASSWORD, Enrolled, create_request, independent_totp, reset_token, rpc_error, wait_until
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import KEY_ENCRYPTION_KEY, RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users_grpc.adapters.mongo.outbox import _mail_associated_data
from users_grpc.adapters.secrets_at_rest import SecretsAtRest

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def dump(mongodb_uri: str, database: str) -> dict[str, list[dict[str, Any]]]:
    """Every document of every collection, as a stolen copy of the database holds them."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        db = client[database]
        return {name: list(db[name].find()) for name in db.list_collection_names()}


def leaves(value: Any) -> Iterator[str | bytes]:
    """Every string and byte string inside a document, keys included."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    elif isinstance(value, str | bytes):
        yield value
    elif isinstance(value, ObjectId):
        yield str(value)


def assert_nowhere(secret: str, stored: dict[str, list[dict[str, Any]]]) -> None:
    """``secret`` appears in no stored string or byte string (a 6-digit code: not as a number of its own)."""
    pattern = re.compile(rf"(?<![0-9a-f]){re.escape(secret)}(?![0-9a-f])" if secret.isdigit() else re.escape(secret))
    for collection, documents in stored.items():
        for leaf in leaves(documents):
            text = leaf if isinstance(leaf, str) else leaf.decode("latin-1")
            assert not pattern.search(text), f"{secret!r} stored in {collection}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_a_copy_of_the_database_holds_no_code_or_token(server: RunningServer, mail: MailSink, mongodb_uri: str) -> None:
    """Registration, forgot-password, sign-in, refresh and MFA confirmation leave nothing usable behind."""
    database = server.settings.mongodb_database
    keys = SecretsAtRest(KEY_ENCRYPTION_KEY)

    user_id = server.anonymous.CreateUser(create_request()).user.id
    code = mail.code_for("jane@example.com")
    stored = dump(mongodb_uri, database)
    [jane] = [u for u in stored["users"] if u["username"] == "jane"]
    digest = jane["activation"]["digest"]
    # Not the plain hash an attacker could test all million codes against in half a second...
    assert digest not in {sha256(f"activation\0jane\0{code}"), sha256(code), sha256(f"{user_id}\0{code}")}
    # ...but a keyed one, bound to the user's id.
    assert digest == keys.digest("activation-code", user_id, code)
    assert digest != keys.digest("activation-code", server.admin_id, code)
    assert_nowhere(code, stored)
    # The long activation token mailed with the code: a keyed digest too, and the token nowhere.
    activation_token = mail.activation_token_for("jane@example.com")
    assert jane["activation"]["token_digest"] == keys.digest("activation-token", user_id, activation_token)
    assert_nowhere(activation_token, stored)
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code))

    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    token = reset_token(mail, "jane@example.com")
    named_user, _, secret = token.partition(".")
    assert named_user == user_id
    stored = dump(mongodb_uri, database)
    [jane] = [u for u in stored["users"] if u["username"] == "jane"]
    digest = jane["password_reset"]["digest"]
    assert digest not in {sha256(f"password-reset\0{token}"), sha256(token), sha256(f"password-reset\0{secret}")}
    assert digest == keys.digest("password-reset", user_id, secret)
    for part in (token, secret):
        assert_nowhere(part, stored)

    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    refreshed = server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=signed_in.refresh_token))
    own = server.stub_for(refreshed.access_token)
    enrollment = own.EnableMfa(pb.EnableMfaRequest(user_id=user_id, password=PASSWORD))
    confirmed = own.ConfirmMfa(
        pb.ConfirmMfaRequest(user_id=user_id, code=independent_totp(enrollment.secret, time.time()))
    )
    recovery_codes = list(confirmed.recovery_codes)
    # Every mail went out, and was deleted once delivered.
    wait_until(lambda: dump(mongodb_uri, database).get("outbox", []) == [], what="an empty outbox")

    stored = dump(mongodb_uri, database)
    [session] = [s for s in stored["sessions"] if str(s["_id"]) == signed_in.session_id]
    assert session["token_digest"] not in {sha256(refreshed.refresh_token), sha256(signed_in.refresh_token)}
    assert session["token_digest"] == keys.digest("refresh-token", signed_in.session_id, refreshed.refresh_token)
    [jane] = [u for u in stored["users"] if u["username"] == "jane"]
    recovery_digests = set(jane["mfa"]["recovery_digests"])
    for recovery_code in recovery_codes:
        normalized = recovery_code.replace("-", "")
        assert sha256(f"recovery\0{normalized}") not in recovery_digests
        assert keys.digest("recovery-code", user_id, normalized) in recovery_digests
    for secret_text in (
        signed_in.refresh_token,
        refreshed.refresh_token,
        *(part for t in (signed_in.refresh_token, refreshed.refresh_token) for part in t.split(".")[2:]),
        *recovery_codes,
        *(c.replace("-", "") for c in recovery_codes),
        enrollment.secret,
    ):
        assert_nowhere(secret_text, stored)


def test_outbox_bodies_are_sealed_until_delivered(
    start_server: StartServer, mongodb_uri: str, dead_smtp_port: int
) -> None:
    """While a mail waits (here: the relay is down) the outbox shows whom and what about, not the code."""
    server = start_server(smtp_port=dead_smtp_port, mail_retry_seconds=60)
    server.anonymous.CreateUser(create_request())
    database = server.settings.mongodb_database
    wait_until(lambda: any(m.get("last_error") for m in dump(mongodb_uri, database)["outbox"]), what="a failed try")
    [queued] = dump(mongodb_uri, database)["outbox"]
    assert (queued["to"], queued["subject"]) == ("jane@example.com", "Your activation code")
    assert "body" not in queued
    assert b"activation code" not in bytes(queued["sealed_body"])
    # With the key-encryption key the body opens, bound to its own mail: the code it carries is
    # nowhere else in the database.
    body = SecretsAtRest(KEY_ENCRYPTION_KEY).open_mail_body(
        bytes(queued["sealed_body"]), _mail_associated_data(queued["_id"], queued["to"], queued["subject"])
    )
    match = re.search(r"code is (\d{6})", body)
    assert match, body
    assert_nowhere(match.group(1), dump(mongodb_uri, database))


def test_a_body_moved_to_another_mail_is_never_sent(
    start_server: StartServer, mongodb_uri: str, dead_smtp_port: int
) -> None:
    """The seal binds a body to its mail: swapped into another recipient's mail, it does not open,
    and that mail is given up rather than sent."""
    server = start_server(smtp_port=dead_smtp_port, mail_retry_seconds=3600)
    server.anonymous.CreateUser(create_request())
    server.anonymous.CreateUser(create_request(username="mallory", email="mallory@example.com"))
    database = server.settings.mongodb_database
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        outbox = client[database].outbox
        wait_until(lambda: outbox.count_documents({"last_error": {"$exists": True}}) == 2, what="two failed tries")
        jane = outbox.find_one({"to": "jane@example.com"})
        assert jane is not None
        outbox.update_one(
            {"to": "mallory@example.com"},
            {"$set": {"sealed_body": jane["sealed_body"], "next_attempt_at": jane["created_at"]}},
        )
        outbox.update_one({"to": "jane@example.com"}, {"$set": {"status": "failed"}})
        wait_until(lambda: outbox.count_documents({"status": "failed"}) == 2, what="the moved body given up")
        mallory = outbox.find_one({"to": "mallory@example.com"})
        assert mallory is not None
        assert mallory["last_error"] == "the sealed body does not open"


def test_a_legacy_recovery_code_works_once(start_server: StartServer, mail: MailSink, mongodb_uri: str) -> None:
    """Recovery codes stored before digests were keyed (unsalted SHA-256) keep working, each once."""
    clock = FakeClock()
    enrolled = Enrolled(start_server(clock=clock), mail, clock)
    legacy = ["abcd-efgh-ijkl", "mnop-qrst-uvwx"]
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        client[enrolled.server.settings.mongodb_database].users.update_one(
            {"username": "jane"},
            {"$set": {"mfa.recovery_digests": [sha256(f"recovery\0{c.replace('-', '')}") for c in legacy]}},
        )
    assert enrolled.sign_in(recovery_code=legacy[0]).access_token
    assert enrolled.sign_in_error(recovery_code=legacy[0]).code() == UNAUTHENTICATED
    # The new codes were replaced by the legacy set above: they no longer work.
    assert enrolled.sign_in_error(recovery_code=enrolled.recovery_codes[0]).code() == UNAUTHENTICATED
    assert enrolled.sign_in(recovery_code=legacy[1].upper()).access_token


def test_an_old_style_reset_token_is_refused(server: RunningServer, mail: MailSink) -> None:
    """A reset token names its user; anything else is the same INVALID_ARGUMENT as a wrong token."""
    for token in ("x" * 43, "not-an-id.secret", f"{server.admin_id}.", f"{server.admin_id}.wrong"):
        request = pb.ResetPasswordRequest(token=token, new_password="a brand new passphrase")
        request.new_password_confirmation = request.new_password
        assert rpc_error(server.anonymous.ResetPassword, request).code() == grpc.StatusCode.INVALID_ARGUMENT
