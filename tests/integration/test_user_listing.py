"""More of the repository against the real database: ListUsers' filters, what an account and a
session read back with, the audit trail's filters, service accounts, the service's own key
material, the outbox's sealed bodies, and each call's database budget."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from datetime import timedelta

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient

from tests.support.records import NOW, new_user
from tests.support.stores import Stores, paused
from users_grpc.devdb import DevDatabase
from users_grpc.domain import (
    ActorKind,
    AuditActor,
    AuditEvent,
    AuditEventType,
    AuditFilter,
    Mail,
    Mfa,
    PasswordScheme,
    Role,
    ServiceAccount,
    Session,
    User,
    UserFilter,
    UserState,
)
from users_grpc.errors import AlreadyExists, StorageUnavailable
from users_grpc.repository import (
    DatabaseBudget,
    Document,
    MongoOutbox,
    MongoUserRepository,
    database_budget,
)
from users_grpc.secrets_at_rest import SecretsAtRest

NOTICE = Mail(to="jane@example.com", subject="s", body="b")


async def some_users(stores: Stores) -> dict[str, User]:
    """One user in each state, an admin, one with MFA on, created a day apart, and one being deleted."""
    users = stores.users
    made: dict[str, User] = {}
    for n, name in enumerate(("pending", "admin", "mfa", "locked", "gone", "deactivated", "deleting")):
        fields = new_user(name, "second.factor@example.com" if name == "mfa" else f"{name}@example.com")
        role = Role.ADMIN if name == "admin" else Role.USER
        made[name] = await users.add(dataclasses.replace(fields, created_at=NOW + timedelta(days=n), role=role))
        if name != "pending":
            assert await users.activate(made[name].id, "d1", NOW) is not None
    assert await users.start_mfa_enrollment(made["mfa"].id, b"s", NOW)
    assert await users.confirm_mfa(made["mfa"].id, 1, [], NOW, NOTICE)
    for name, state in (("locked", UserState.LOCKED), ("deactivated", UserState.DEACTIVATED)):
        assert await users.change_state(made[name].id, from_states=frozenset({UserState.ACTIVE}), to=state, now=NOW)
    assert await users.delete(made.pop("gone").id)
    await stores.database["users"].update_one({"_id": ObjectId(made.pop("deleting").id)}, {"$set": {"deleting": NOW}})
    return made


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (UserFilter(), ["pending", "admin", "mfa", "locked", "deactivated"]),
        (UserFilter(role=Role.ADMIN), ["admin"]),
        (UserFilter(role=Role.USER), ["pending", "mfa", "locked", "deactivated"]),
        (UserFilter(state=UserState.ACTIVE), ["admin", "mfa"]),
        (UserFilter(state=UserState.PENDING_ACTIVATION), ["pending"]),
        (UserFilter(state=UserState.LOCKED), ["locked"]),
        (UserFilter(state=UserState.DEACTIVATED), ["deactivated"]),
        (UserFilter(mfa_enabled=True), ["mfa"]),
        (UserFilter(mfa_enabled=False), ["pending", "admin", "locked", "deactivated"]),
        (UserFilter(prefix_key="lo"), ["locked"]),
        (UserFilter(prefix_key="mf"), ["mfa"]),  # by username
        (UserFilter(prefix_key="second.f"), ["mfa"]),  # by email
        (UserFilter(prefix_key="ocked"), []),  # a prefix, not a substring
        (UserFilter(prefix_key="."), []),  # the caller's text, never a pattern
        (UserFilter(created_after=NOW + timedelta(days=2)), ["mfa", "locked", "deactivated"]),
        (UserFilter(created_before=NOW + timedelta(days=2)), ["pending", "admin"]),
        (UserFilter(role=Role.USER, state=UserState.ACTIVE), ["mfa"]),
    ],
)
async def test_listed_users_match_every_filter_and_never_include_deleted_ones(
    stores: Stores, filters: UserFilter, expected: list[str]
) -> None:
    made = await some_users(stores)
    listed = await stores.users.list_users(filters, None, 100)
    assert [user.username for user in listed] == expected
    assert [user.id for user in listed] == [made[name].id for name in expected]
    assert listed == [await stores.users.get(made[name].id) for name in expected]
    assert await stores.users.count_users(filters) == len(expected)


async def test_list_pages_follow_the_id_after_the_last_one(stores: Stores) -> None:
    await some_users(stores)
    first = await stores.users.list_users(UserFilter(), None, 2)
    second = await stores.users.list_users(UserFilter(), first[-1].id, 2)
    third = await stores.users.list_users(UserFilter(), second[-1].id, 2)
    assert [u.username for u in first + second + third] == ["pending", "admin", "mfa", "locked", "deactivated"]


async def test_an_account_reads_back_its_secrets_its_scheme_and_its_mfa(stores: Stores) -> None:
    users = stores.users
    imported = dataclasses.replace(new_user(), password_scheme=PasswordScheme.BCRYPT, imported=True)
    user = await users.add(imported)
    account = await users.get_account(user.id)
    assert account is not None
    assert (account.password_scheme, account.mfa, account.password_reset) == (PasswordScheme.BCRYPT, None, None)
    # The first sign-in replaces an imported hash with ours, once.
    assert not await users.upgrade_password_hash(user.id, "other", "$ours")
    assert await users.upgrade_password_hash(user.id, "$2b$10$hash", "$ours")
    assert not await users.upgrade_password_hash(user.id, "$ours", "$ours2")
    account = await users.get_account(user.id)
    assert account is not None
    assert (account.password_hash, account.password_scheme) == ("$ours", PasswordScheme.PEPPERED)
    assert await users.activate(user.id, "d1", NOW) is not None
    assert await users.start_mfa_enrollment(user.id, b"secret", NOW)
    assert await users.confirm_mfa(user.id, 7, ["r1", "r2"], NOW, NOTICE)
    account = await users.get_account(user.id)
    assert account is not None
    assert account.mfa == Mfa(active=True, sealed_secret=b"secret", last_used_step=7, recovery_digests=("r1", "r2"))
    assert account.user.mfa_enabled
    assert account.user.token_version == 1
    # A sealed TOTP secret is resealed only if it is still what was read.
    assert await users.sealed_totp_secrets(None, 10) == [(user.id, b"secret")]
    assert await users.sealed_totp_secrets(user.id, 10) == []
    assert not await users.reseal_totp_secret(user.id, b"other", b"new")
    assert await users.reseal_totp_secret(user.id, b"secret", b"new")
    account = await users.get_account(user.id)
    assert account is not None
    assert account.mfa is not None
    assert account.mfa.sealed_secret == b"new"


async def test_an_admins_mfa_reset_removes_any_enrollment_and_ends_tokens(stores: Stores) -> None:
    users = stores.users
    user = await users.add(new_user())
    assert not await users.reset_mfa(user.id, NOW, NOTICE)
    assert await users.start_mfa_enrollment(user.id, b"s", NOW)
    assert await users.reset_mfa(user.id, NOW, NOTICE)
    account = await users.get_account(user.id)
    assert account is not None
    assert (account.mfa, account.user.token_version) == (None, 1)
    assert not await users.reset_mfa(user.id, NOW, NOTICE)


async def test_a_session_reads_back_as_it_was_made(stores: Stores) -> None:
    sessions = stores.sessions
    session_id = sessions.new_id()
    made = await sessions.create(session_id, "u1", "t", NOW, NOW + timedelta(days=1), 3)
    assert made == Session(
        id=session_id,
        user_id="u1",
        created_at=NOW,
        last_used_at=NOW,
        expires_at=NOW + timedelta(days=1),
        token_version=3,
    )
    assert await sessions.list_active("u1", NOW) == [made]
    rotated = await sessions.rotate(session_id, 0, "t", "t2", NOW + timedelta(hours=1))
    assert rotated == dataclasses.replace(made, last_used_at=NOW + timedelta(hours=1))
    assert await sessions.rotate(session_id, 1, "t2", "t3", NOW + timedelta(days=1)) is None  # expired
    # Stored before sessions carried the token version: version 0, which the first tokens had.
    await stores.database["sessions"].update_one({"_id": ObjectId(session_id)}, {"$unset": {"token_version": ""}})
    [legacy] = await sessions.list_active("u1", NOW)
    assert legacy.token_version == 0


def audit_event(n: int, type_: AuditEventType, subject: str, actor: str) -> AuditEvent:
    return AuditEvent(
        type=type_,
        time=NOW + timedelta(minutes=n),
        actor=AuditActor(kind=ActorKind.USER, id=actor, source=f"10.0.0.{n}"),
        subject_id=subject,
        status_code=n,
        error_reason=f"reason{n}",
        reason=f"note{n}",
    )


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (AuditFilter(), [3, 2, 1, 0]),
        (AuditFilter(subject_id="s1"), [1, 0]),
        (AuditFilter(actor_id="a1"), [2, 0]),
        (AuditFilter(types=frozenset({AuditEventType.USER_UNLOCK, AuditEventType.USER_DELETE})), [3, 1]),
        (AuditFilter(start_time=NOW + timedelta(minutes=1)), [3, 2, 1]),
        (AuditFilter(end_time=NOW + timedelta(minutes=1)), [0]),
        (AuditFilter(subject_id="s1", actor_id="a1"), [0]),
    ],
)
async def test_audit_events_match_every_filter_and_read_back_whole(
    stores: Stores, filters: AuditFilter, expected: list[int]
) -> None:
    events = [
        audit_event(0, AuditEventType.USER_LOCK, "s1", "a1"),
        audit_event(1, AuditEventType.USER_UNLOCK, "s1", "a2"),
        audit_event(2, AuditEventType.USER_LOCK, "s2", "a1"),
        audit_event(3, AuditEventType.USER_DELETE, "s2", "a2"),
    ]
    for event in events:
        await stores.audit.add(event)
    listed = await stores.audit.list_events(filters, None, 10)
    assert [dataclasses.replace(event, id="") for event in listed] == [events[n] for n in expected]
    assert all(ObjectId.is_valid(event.id) for event in listed)


async def test_service_accounts_have_unique_names_and_never_read_back_their_secret(stores: Stores) -> None:
    accounts = stores.service_accounts
    await accounts.ensure_indexes()
    first = ServiceAccount(client_id=accounts.new_id(), name="billing", created_at=NOW)
    second = ServiceAccount(client_id=accounts.new_id(), name="reports", created_at=NOW)
    await accounts.add(first, "digest1")
    await accounts.add(second, "digest2")
    with pytest.raises(AlreadyExists) as error:
        await accounts.add(ServiceAccount(client_id=accounts.new_id(), name="billing", created_at=NOW), "d")
    assert error.value.field == "name"
    assert await accounts.get(first.client_id) == first
    assert await accounts.secret_digest(first.client_id) == "digest1"
    assert await accounts.secret_digest(accounts.new_id()) is None
    assert await accounts.list_after(None, 10) == [first, second]
    assert await accounts.list_after(first.client_id, 10) == [second]
    assert await accounts.list_after(None, 1) == [first]
    assert await accounts.delete(first.client_id)
    assert not await accounts.delete(first.client_id)
    assert await accounts.get(first.client_id) is None
    stored = await stores.database["service_accounts"].find_one({"_id": ObjectId(second.client_id)})
    assert stored is not None
    assert stored["secret_digest"] == "digest2"


async def test_key_material_is_added_once_and_resealed_only_from_what_was_read(stores: Stores) -> None:
    material = stores.key_material
    assert await material.get("root") is None
    assert await material.add("root", b"sealed")
    assert not await material.add("root", b"another replica's")
    assert await material.get("root") == b"sealed"
    assert not await material.reseal("root", b"stale", b"new")
    assert await material.reseal("root", b"sealed", b"new")
    assert await material.get("root") == b"new"
    assert await stores.database["key_material"].count_documents({}) == 1
    assert await stores.keys.reseal("k", b"a", b"b") is False


async def test_a_mail_whose_body_does_not_open_is_given_up_and_others_still_go(stores: Stores) -> None:
    outbox = stores.outbox
    await outbox.enqueue(Mail(to="a@x.io", subject="first", body="b1"), NOW)
    await outbox.enqueue(Mail(to="b@x.io", subject="second", body="b2"), NOW + timedelta(seconds=1))
    first = await stores.database["outbox"].find_one({"subject": "first"})
    assert first is not None
    # Moved to another recipient: the body no longer opens.
    await stores.database["outbox"].update_one({"_id": first["_id"]}, {"$set": {"to": "evil@x.io"}})
    claimed = await outbox.claim(NOW + timedelta(seconds=1), 60)
    assert claimed is not None
    assert claimed.mail == Mail(to="b@x.io", subject="second", body="b2")
    assert await outbox.counts() == (1, 1, NOW + timedelta(seconds=1))
    given_up = await stores.database["outbox"].find_one({"_id": first["_id"]})
    assert given_up is not None
    assert (given_up["status"], given_up["last_error"]) == ("failed", "the sealed body does not open")


async def test_bodies_are_resealed_under_the_new_key_and_mail_of_no_key_is_counted(stores: Stores) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = MongoOutbox(stores.database, SecretsAtRest(old_key))
    await before.enqueue(Mail(to="a@x.io", subject="s", body="b1"), NOW)
    await before.enqueue(Mail(to="b@x.io", subject="s", body="b2"), NOW)
    await MongoOutbox(stores.database, SecretsAtRest(os.urandom(32))).enqueue(
        Mail(to="c@x.io", subject="s", body="b3"), NOW
    )
    after = MongoOutbox(stores.database, SecretsAtRest(new_key, (old_key,)))
    assert await after.reseal_bodies() == (2, 0, 1)
    assert await after.reseal_bodies() == (0, 2, 1)
    only_new = MongoOutbox(stores.database, SecretsAtRest(new_key))
    bodies = set()
    for _ in range(2):
        mail = await only_new.claim(NOW, 60)
        assert mail is not None
        bodies.add(mail.mail.body)
    assert bodies == {"b1", "b2"}


async def test_a_notice_queued_before_the_outbox_named_its_user_is_traced_to_the_user_holding_it(
    stores: Stores,
) -> None:
    users, outbox = stores.users, stores.outbox
    user = await users.add(new_user())
    assert await users.set_password(user.id, "$2b$10$new", NOW, NOTICE)
    pending = await users.claim_pending_notices(NOW, 60)
    assert pending is not None
    [notice] = pending.notices
    await outbox.enqueue(notice.mail, NOW, mail_id=notice.id, notice_of=user.id)
    await outbox.enqueue(Mail(to="a@x.io", subject="s", body="b"), NOW + timedelta(seconds=1))
    await stores.database["outbox"].update_one({"_id": ObjectId(notice.id)}, {"$unset": {"notice_of": ""}})
    first = await outbox.claim(NOW + timedelta(seconds=1), 60)
    assert first is not None
    assert (first.id, first.notice_of) == (notice.id, user.id)
    second = await outbox.claim(NOW + timedelta(seconds=1), 60)
    assert second is not None
    assert second.notice_of is None  # queued as no notice
    await users.release_notices(pending)
    await outbox.retry_later(first.id, NOW, "again")
    again = await outbox.claim(NOW + timedelta(seconds=2), 60)
    assert again is not None
    assert (again.id, again.notice_of) == (notice.id, None)  # no user holds it any more


async def test_a_budget_bounds_each_operation_and_never_outlasts_the_deadline(own_database: DevDatabase) -> None:
    """A database that stops answering fails the call at its budget, or at once past its deadline,
    as :class:`StorageUnavailable`; a live one answers within the budget."""
    assert DatabaseBudget(5).seconds() == 5
    assert DatabaseBudget(5, time.monotonic() + 100).seconds() == 5
    assert 1 < DatabaseBudget(5, time.monotonic() + 2).seconds() <= 2
    assert DatabaseBudget(5, time.monotonic() - 1).seconds() == 0.001

    async def bounded(budget: DatabaseBudget, users: MongoUserRepository, user_id: str) -> User | None:
        token = database_budget.set(budget)
        try:
            return await users.get(user_id)
        finally:
            database_budget.reset(token)

    client: AsyncMongoClient[Document] = AsyncMongoClient(own_database.uri, tz_aware=True)
    try:
        users = MongoUserRepository(client["budget"])
        user = await users.add(new_user())
        assert await bounded(DatabaseBudget(30, time.monotonic() + 30), users, user.id) == user
        with paused(own_database):
            for budget in (DatabaseBudget(0.2), DatabaseBudget(30, time.monotonic() - 1)):
                with pytest.raises(StorageUnavailable):
                    await asyncio.wait_for(bounded(budget, users, user.id), 10)
    finally:
        await client.close()
