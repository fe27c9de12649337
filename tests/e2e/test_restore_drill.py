"""The restore drill of docs/operations.md ("Backups and the restore drill"): every collection
copied into a fresh database and served with the same key-encryption key is the service as it
was; the same copy with any other key does not start."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any

import grpc
from pymongo import MongoClient

from tests.support.calls import PASSWORD, Enrolled, create_request, rpc_error, signed_up, users_grpc
from tests.support.fakes import FakeClock
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb


def copy_every_collection(mongodb_uri: str, source: str, target: str) -> set[str]:
    """What a logical backup and restore (mongodump, mongorestore) does with the documents."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    with client:
        names = {name for name in client[source].list_collection_names() if not name.startswith("system.")}
        for name in names:
            documents = list(client[source][name].find())
            if documents:
                client[target][name].insert_many(documents)
            else:
                client[target].create_collection(name)
    return names


def key_set(server: RunningServer) -> Any:
    return json.loads(server.anonymous.GetPublicKeys(pb.GetPublicKeysRequest()).jwks_json)


def test_a_copy_of_every_collection_served_with_the_same_key_is_the_service_as_it_was(
    start_server: StartServer, mail: MailSink, mongodb_uri: str, database_name: str
) -> None:
    clock = FakeClock()  # one clock for both servers, so the TOTP step moves on only when the test says
    old = start_server(clock=clock)
    jane = Enrolled(old, mail, clock)  # MFA on
    bob = signed_up(old, mail, "bob")  # MFA off, signed in on the old server

    restored = f"{database_name}_restored"
    collections = copy_every_collection(mongodb_uri, database_name, restored)
    assert {"users", "sessions", "signing_keys", "outbox", "throttles", "leases"} <= collections
    new = start_server(clock=clock, mongodb_database=restored)

    # The same signing keys: what the old server signed verifies on the restored one.
    assert key_set(new) == key_set(old)
    own = new.stub_for(bob.access_token)
    assert own.GetUser(pb.GetUserRequest(id=bob.user.id)).user.username == "bob"
    claims = new.stub.ValidateToken(pb.ValidateTokenRequest(access_token=bob.access_token)).claims
    assert claims.subject == bob.user.id
    # Sessions, whose refresh tokens are stored as digests under keys derived from the key.
    refreshed = new.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=bob.refresh_token))
    assert refreshed.access_token
    # Passwords, and a TOTP secret sealed under the key.
    signed_in = new.anonymous.Authenticate(pb.AuthenticateRequest(identifier="bob", password=PASSWORD))
    assert signed_in.user.id == bob.user.id
    second_factor = pb.AuthenticateRequest(identifier="jane", password=PASSWORD, totp_code=jane.code())
    assert new.anonymous.Authenticate(second_factor).user.id == jane.user_id
    # The unique indexes, made again at start-up over the copied documents.
    taken = create_request(username="bob", email="bob@example.com")
    assert rpc_error(new.anonymous.CreateUser, taken).code() == grpc.StatusCode.ALREADY_EXISTS


def test_the_copy_without_its_key_does_not_start(
    start_server: StartServer, mail: MailSink, mongodb_uri: str, database_name: str
) -> None:
    """Why the key-encryption key is backed up with the database: no other key opens the copy."""
    old = start_server()
    signed_up(old, mail, "bob")
    restored = f"{database_name}_restored"
    copy_every_collection(mongodb_uri, database_name, restored)
    other_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    settings = dataclasses.replace(old.settings, mongodb_database=restored)
    result = users_grpc("keys", "rotate", server_settings=settings, USERS_KEY_ENCRYPTION_KEY=other_key)
    assert result.returncode == 2, result.stderr
    assert "USERS_KEY_ENCRYPTION_KEY does not open the signing keys" in result.stderr
