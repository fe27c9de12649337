"""Usernames and emails stay unique through claims (no unique index on ``users``), and schema
migrations bring a database written before claims forward."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from bson import ObjectId
from google.protobuf import field_mask_pb2
from pymongo import ASCENDING, AsyncMongoClient, MongoClient

from tests.support.calls import PASSWORD, create_request, users_grpc
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.adapters.mongo.claims import CLAIM_SETTLE_SECONDS
from users_grpc.adapters.mongo.housekeeping import MongoHousekeeping
from users_grpc.adapters.mongo.schema import MongoSchema
from users_grpc.domain.rules import identifier_key
from users_grpc.ops import migrations


@pytest.fixture
def db(mongodb_uri: str, database_name: str) -> Iterator[Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri, tz_aware=True)
    yield client[database_name]
    client.close()


def outcome(call: Any, request: Any) -> grpc.StatusCode:
    try:
        call(request, timeout=30)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def claims_without_their_user(db: Any) -> list[str]:
    """Claims whose user does not hold the name: none may be left once every call is done."""
    orphans = []
    for claim in db.claims.find():
        kind, _, key = claim["_id"].partition(":")
        if db.users.find_one({"_id": claim["user_id"], f"{kind}_key": key}) is None:
            orphans.append(claim["_id"])
    return orphans


def test_twenty_parallel_registrations_of_one_email_have_one_winner(server: RunningServer, db: Any) -> None:
    spellings = ["race.winner@example.com", "Race.Winner@Example.com", "RACE.WINNER@EXAMPLE.COM"]
    requests = [create_request(username=f"racer{n}", email=spellings[n % 3]) for n in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda request: outcome(server.anonymous.CreateUser, request), requests))
    assert codes.count(grpc.StatusCode.OK) == 1, codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}
    assert db.users.count_documents({"email_key": "race.winner@example.com"}) == 1
    assert claims_without_their_user(db) == []


def test_twenty_parallel_renames_to_one_username_have_one_winner(server: RunningServer, db: Any) -> None:
    ids = [
        server.stub.CreateUser(create_request(username=f"renamer{n}", email=f"renamer{n}@example.com")).user.id
        for n in range(20)
    ]
    mask = field_mask_pb2.FieldMask(paths=["username"])
    requests = [
        pb.UpdateUserRequest(user_id=user_id, user=user_pb2.User(username="Chosen"), update_mask=mask)
        for user_id in ids
    ]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda request: outcome(server.stub.UpdateUser, request), requests))
    assert codes.count(grpc.StatusCode.OK) == 1, codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}
    winner = db.users.find_one({"username_key": "chosen"})
    assert winner is not None
    # The winner's old name was given up; the losers kept theirs.
    assert db.claims.find_one({"_id": f"username:renamer{ids.index(str(winner['_id']))}"}) is None
    assert db.claims.count_documents({"_id": {"$regex": "^username:renamer"}}) == 19
    assert claims_without_their_user(db) == []


def test_a_renamed_or_deleted_users_names_become_free(server: RunningServer, mail: MailSink, db: Any) -> None:
    first = server.stub.CreateUser(create_request(username="olive", email="olive@example.com")).user
    mask = field_mask_pb2.FieldMask(paths=["username"])
    server.stub.UpdateUser(
        pb.UpdateUserRequest(user_id=first.id, user=user_pb2.User(username="Olivia"), update_mask=mask)
    )
    taken = create_request(username="olivia", email="other@example.com")
    assert outcome(server.anonymous.CreateUser, taken) == grpc.StatusCode.ALREADY_EXISTS
    second = server.anonymous.CreateUser(create_request(username="olive", email="olive2@example.com")).user
    assert second.username == "olive"
    # Lookups by name find the name's holder now, not the user who held it before.
    code = mail.code_for("olive2@example.com")
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="OLIVE", code=code))
    found = server.stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier="OLIVE")).user
    assert found.id == second.id
    server.stub.DeleteUser(pb.DeleteUserRequest(id=first.id))
    assert server.anonymous.CreateUser(create_request(username="olivia", email="olive@example.com")).user.id
    assert claims_without_their_user(db) == []


def test_a_claim_whose_user_was_never_written_is_released_after_its_bound(
    start_server: StartServer, db: Any, mongodb_uri: str, database_name: str
) -> None:
    server = start_server()
    now = datetime.now(UTC)
    # As a process killed between its claim and its user's insert leaves it.
    for kind, key in (("username", "ghost"), ("email", "ghost@example.com")):
        db.claims.insert_one({"_id": f"{kind}:{key}", "user_id": ObjectId(), "claimed_at": now, "pending_since": now})
    request = create_request(username="ghost", email="ghost@example.com")
    # Within its bound the claim may still be a registration in flight: the name is taken.
    assert outcome(server.anonymous.CreateUser, request) == grpc.StatusCode.ALREADY_EXISTS

    # Past the bound, housekeeping releases it...
    async def sweep(at: datetime) -> int:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri, tz_aware=True)
        try:
            return await MongoHousekeeping(client[database_name]).release_stale_claims(at)
        finally:
            await client.close()

    assert asyncio.run(sweep(now + timedelta(seconds=CLAIM_SETTLE_SECONDS - 1))) == 0
    assert asyncio.run(sweep(now + timedelta(seconds=CLAIM_SETTLE_SECONDS + 1))) == 2
    assert db.claims.count_documents({}) == 2  # the admin's, settled long ago
    # ...and a claimant past it takes over a claim no sweep looks at: settled, its user gone
    # (a deletion that died between deleting the user and releasing the names).
    db.claims.insert_one(
        {"_id": "email:ghost@example.com", "user_id": ObjectId(), "claimed_at": now - timedelta(hours=1)}
    )
    assert server.anonymous.CreateUser(request).user.username == "ghost"
    assert claims_without_their_user(db) == []


class Killed(Exception):
    """The process dying, as far as the migration can tell."""


def legacy_database(server: RunningServer, db: Any, names: list[str]) -> None:
    """Leave the database as code before claims wrote it: unique indexes, no claims, no schema record."""
    for name in names:
        server.anonymous.CreateUser(create_request(username=name, email=f"{name}@example.com"))
    server.stop()
    db.claims.drop()
    db.schema.drop()
    for field in ("username_key", "email_key"):
        db.users.drop_index(field)
        db.users.create_index([(field, ASCENDING)], unique=True, name=f"{field}_unique")


def test_migrate_brings_a_database_from_before_claims_forward(
    start_server: StartServer, mail: MailSink, db: Any, mongodb_uri: str, database_name: str
) -> None:
    names = [f"legacy{n:02d}" for n in range(12)]
    writer = start_server()
    settings = writer.settings
    legacy_database(writer, db, names)

    dry = users_grpc("migrate", "--dry-run", "--all-replicas-upgraded", server_settings=settings)
    assert dry.returncode == 0, dry.stderr
    assert "would apply step 1" in dry.stdout
    assert "would apply step 2" in dry.stdout
    assert db.claims.count_documents({}) == 0  # a dry run changes nothing
    assert "username_key_unique" in db.users.index_information()

    # A run that dies halfway through the claims (after one batch) resumes where it stopped.
    async def interrupted() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri, tz_aware=True)
        schema = MongoSchema(client[database_name])
        real_record = schema.record

        async def record_then_die(version: int, **progress: Any) -> None:
            await real_record(version, **progress)
            if progress:
                raise Killed

        schema.record = record_then_die  # type: ignore[method-assign]
        try:
            await migrations.claim_existing_names(schema, datetime.now(UTC))
        except Killed:
            pass
        finally:
            await client.close()

    migrations_batch, migrations.BACKFILL_BATCH = migrations.BACKFILL_BATCH, 5
    try:
        asyncio.run(interrupted())
        assert 0 < db.claims.count_documents({}) < 2 * (len(names) + 1)
        progress = db.schema.find_one({"_id": "users"})["progress"]["claimed_after"]
        # Step 1 only: step 2 waits until every replica runs this version.
        first = users_grpc("migrate", server_settings=settings)
    finally:
        migrations.BACKFILL_BATCH = migrations_batch
    assert first.returncode == 0, first.stderr
    assert "applying step 1" in first.stdout
    assert "stopping before step 2" in first.stdout
    assert db.schema.find_one({"_id": "users"})["version"] == 1
    assert progress is not None
    assert "username_key_unique" in db.users.index_information()
    # At version 1 names are found on users, as before claims (an older replica may write a user without one).
    at_version_1 = start_server()
    code = mail.code_for(f"{names[-1]}@example.com")
    at_version_1.anonymous.ActivateUser(pb.ActivateUserRequest(identifier=names[-1], code=code))
    assert at_version_1.stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=names[-1])).user.is_active
    at_version_1.stop()

    second = users_grpc("migrate", "--all-replicas-upgraded", server_settings=settings)
    assert second.returncode == 0, second.stderr
    assert "applying step 2" in second.stdout
    assert "username_key_unique" not in db.users.index_information()
    claims = {claim["_id"]: claim["user_id"] for claim in db.claims.find()}
    for user in db.users.find():
        assert claims[f"username:{user['username_key']}"] == user["_id"]
        assert claims[f"email:{user['email_key']}"] == user["_id"]

    again = users_grpc("migrate", "--all-replicas-upgraded", server_settings=settings)
    assert again.returncode == 0
    assert "applying" not in again.stdout
    assert {claim["_id"]: claim["user_id"] for claim in db.claims.find()} == claims

    # The migrated users sign in, and their names stay theirs.
    server = start_server()
    for name in names[:3]:
        server.anonymous.ActivateUser(
            pb.ActivateUserRequest(identifier=name, code=mail.code_for(f"{name}@example.com"))
        )
        signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier=name, password=PASSWORD))
        assert signed_in.user.username == name
    duplicate = create_request(username=names[0].upper(), email="new@example.com")
    assert outcome(server.anonymous.CreateUser, duplicate) == grpc.StatusCode.ALREADY_EXISTS
    assert identifier_key(names[0].upper()) == names[0]


def test_serve_refuses_a_database_newer_than_it_knows(start_server: StartServer, db: Any) -> None:
    server = start_server()
    server.stop()
    db.schema.update_one({"_id": "users"}, {"$set": {"version": migrations.SCHEMA_VERSION + 1}})
    result = users_grpc("serve", server_settings=server.settings, USERS_GRPC_ADDRESS="127.0.0.1:0")
    assert result.returncode == 2
    assert f"schema version {migrations.SCHEMA_VERSION + 1}, newer than this server's" in result.stderr
