"""The ``users`` collection (:class:`MongoUserRepository`); its concerns in ``users_credentials``,
``users_mfa`` and ``users_notices``, its documents in ``users_bson``."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta

from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure

from users_grpc.adapters.mongo.calls import storage_call
from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.claims import _CLAIM_KINDS, MongoClaims
from users_grpc.adapters.mongo.documents import Document, _is_duplicate_key, _object_id
from users_grpc.adapters.mongo.metadata_bson import _metadata_clause
from users_grpc.adapters.mongo.passkey_ceremonies import MongoCeremonyStore
from users_grpc.adapters.mongo.read_batches import ReadBatches
from users_grpc.adapters.mongo.users_bson import (
    _LIVE,
    _STATE_FILTERS,
    _account_from_document,
    _activation_document,
    _change_entry,
    _user_from_document,
    _with_change,
)
from users_grpc.adapters.mongo.users_credentials import CredentialUpdates
from users_grpc.adapters.mongo.users_metadata import MetadataUpdates
from users_grpc.adapters.mongo.users_mfa import MfaUpdates
from users_grpc.adapters.mongo.users_notices import NoticeUpdates
from users_grpc.adapters.mongo.users_passkeys import PasskeyUpdates
from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import (
    Account,
    ChangeType,
    Gender,
    NewUser,
    PasswordScheme,
    ProfileChanges,
    Role,
    User,
    UserFilter,
    UserState,
    Version,
)
from users_grpc.domain.rules import identifier_key


class MongoUserRepository(CredentialUpdates, MfaUpdates, NoticeUpdates, MetadataUpdates, PasskeyUpdates):
    """The ``users`` collection. Usernames and emails are unique through :class:`MongoClaims`, which
    works when ``users`` is sharded by ``_id`` (a unique index on another field would not)."""

    def __init__(
        self, database: AsyncDatabase[Document], changes: MongoChangeLog | None = None, *, coalesce_reads: bool = False
    ) -> None:
        self._users: AsyncCollection[Document] = database["users"]
        # Concurrent reads by _id (token checks, GetUser) as one find: read_batches.py.
        self._by_id = ReadBatches(self._live_documents) if coalesce_reads else None
        self._leases: AsyncCollection[Document] = database["leases"]
        self._claims = MongoClaims(database)
        self._changes = changes or MongoChangeLog(database)
        # Set from the schema version at start-up: only from version 2 does every user's name
        # have a claim (older replicas may write users without one until then).
        self.lookups_by_claim = False

    @storage_call
    async def ensure_indexes(self) -> None:
        """The indexes every schema version has; the identifier indexes belong to :class:`MongoSchema`."""
        await self._claims.ensure_indexes()
        await self._changes.ensure_indexes()
        # The passkey ceremonies belong to the users' sign-ins: their index is made with the users'.
        await MongoCeremonyStore(self._users.database).ensure_indexes()
        # Serves housekeeping's purge of accounts never activated.
        await self._users.create_index(
            [("is_active", ASCENDING), ("created_at", ASCENDING)], name="is_active_created_at"
        )
        # Serves the count of active admins that keeps at least one.
        await self._users.create_index([("role", ASCENDING), ("is_active", ASCENDING)], name="role_is_active")
        # Sparse: only the few documents with notices waiting are indexed, and the senders'
        # queries (a date range; a notice id) are served by them.
        await self._users.create_index([("pending_mail_since", ASCENDING)], sparse=True, name="pending_mail_since")
        await self._users.create_index([("pending_mail.id", ASCENDING)], sparse=True, name="pending_mail_id")
        # ListUsers pages by _id (its own index serves the unfiltered list and the keyset). A role or
        # state filter walks these in _id order; created_after/created_before ranges use the third.
        # A username/email prefix is an anchored regex on the *_key unique indexes above.
        await self._users.create_index([("role", ASCENDING), ("_id", ASCENDING)], name="role_id")
        await self._users.create_index([("state", ASCENDING), ("_id", ASCENDING)], name="state_id")
        await self._users.create_index([("created_at", ASCENDING), ("_id", ASCENDING)], name="created_at_id")
        await self._ensure_metadata_indexes()
        # ListUsers' external_id filter (SCIM's externalId eq): sparse, as most users have none.
        await self._users.create_index([("external_id", ASCENDING)], sparse=True, name="external_id")

    def new_id(self) -> str:
        return str(ObjectId())

    @storage_call
    async def add(self, new_user: NewUser) -> User:
        """Claim the username, then the email, then write the user; a taken one raises :class:`AlreadyExists`.

        The claims are settled once the user is written. If the outcome of a write is unknown
        (the database went away), the claims stay pending and :meth:`MongoClaims.release_stale`
        decides later, by whether the user exists; releasing them here could free the names of a
        user that was in fact written.
        """
        document = _document_from_new_user(new_user)
        user_id = document["_id"]
        names = [("username", document["username_key"]), ("email", document["email_key"])]
        claimed: list[tuple[str, str]] = []
        for kind, key in names:
            if await self._claims.claim(kind, key, user_id, new_user.created_at) is None:
                for taken_kind, taken_key in claimed:
                    await self._claims.release(taken_kind, taken_key, user_id)
                raise AlreadyExists(kind)
            claimed.append((kind, key))
        # Its first change, pended in the document it is made with (see _with_change).
        document.update(
            change_number=1,
            pending_changes=[_change_entry(ChangeType.CREATED, new_user.created_at)],
            pending_changes_since=new_user.created_at,
        )
        try:
            await self._users.insert_one(document)
        except OperationFailure as error:
            if not _is_duplicate_key(error):
                raise
            # A database still on schema 1 keeps its unique indexes: a user that an older
            # replica wrote without claims is refused by them.
            field = await self._taken_field(document, error)
            for kind, key in claimed:
                await self._claims.release(kind, key, user_id)
            raise AlreadyExists(field) from None
        for kind, key in claimed:
            await self._claims.settle(kind, key, user_id)
        await self._publish(user_id)
        return _user_from_document(document)

    @storage_call
    async def get(self, user_id: str) -> User | None:
        document = await self._live_by_id(_object_id(user_id))
        return None if document is None else _user_from_document(document)

    @storage_call
    async def find_account(self, identifier_key: str) -> Account | None:
        document = await self._find_by_identifier(identifier_key)
        return None if document is None else _account_from_document(document)

    async def _live_by_id(self, user_id: ObjectId | str) -> Document | None:
        """The user with this ``_id`` unless it is being deleted."""
        if self._by_id is not None:
            return await self._by_id.read(user_id)
        return await self._users.find_one({"_id": user_id, **_LIVE})

    async def _live_documents(self, user_ids: list[ObjectId | str]) -> dict[ObjectId | str, Document]:
        """The live users among ``user_ids``, by ``_id``; one id is read by equality, as without batches."""
        if len(user_ids) == 1:
            document = await self._users.find_one({"_id": user_ids[0], **_LIVE})
            return {} if document is None else {document["_id"]: document}
        return {document["_id"]: document async for document in self._users.find({"_id": {"$in": user_ids}, **_LIVE})}

    async def _find_by_identifier(self, identifier_key: str) -> Document | None:
        """The user whose username or email has this key. Through the claims, each read is by
        ``_id``: one shard on a sharded cluster, and an indexed lookup on the embedded database."""
        if not self.lookups_by_claim:
            return await self._users.find_one(_identifier_filter(identifier_key))
        for kind in _CLAIM_KINDS:
            holder = await self._claims.holder(kind, identifier_key)
            if holder is not None:
                # A pending claim's user may not exist yet, or hold the name no longer.
                document = await self._live_by_id(holder)
                if document is not None and document.get(f"{kind}_key") == identifier_key:
                    return document
        return None

    @storage_call
    async def get_account(self, user_id: str) -> Account | None:
        document = await self._live_by_id(_object_id(user_id))
        return None if document is None else _account_from_document(document)

    @storage_call
    async def delete(self, user_id: str) -> bool:
        return await self._delete_where({"_id": _object_id(user_id)})

    @storage_call
    async def delete_by_identifier(self, identifier_key: str) -> bool:
        document = await self._find_by_identifier(identifier_key)
        return document is not None and await self._delete_where({"_id": document["_id"]})

    async def _delete_where(self, query: Document) -> bool:
        """Delete the user ``query`` finds: first mark the document deleting, with its ``deleted``
        change pended in that same update (from then on every call sees the user as gone), then
        publish its changes, move its notices to the outbox and delete it (:meth:`MongoChangeLog.publish`).

        A crash after the mark leaves the rest to the change log's sweep: the deletion stands
        either way, and its change is never lost with the document.
        """
        now = datetime.now(UTC)
        document = await self._users.find_one_and_update(
            {**query, **_LIVE},
            _with_change({"$set": {"deleting": now}}, ChangeType.DELETED, now),
        )
        if document is None:
            return False
        await self._publish(document["_id"])
        return True

    @storage_call
    async def change_state(
        self, user_id: str, *, from_states: frozenset[UserState], to: UserState, now: datetime
    ) -> User | None:
        """Move the user from one of ``from_states`` to ``to`` in one conditional update; the user as
        it was before, or None if it was in no such state. The token version is left to the caller,
        which may still have to undo the change (see :func:`users_grpc.services.last_admin.keep_an_active_admin`)."""
        update: Document = {"$set": {"state": to.value, "is_active": to is UserState.ACTIVE, "updated_at": now}}
        if to is not UserState.ACTIVE:
            # A suspended account has no pending code, reset token or change of address: nothing
            # mailed earlier completes later, and housekeeping's purge of never-activated accounts
            # (which keys on a pending activation) can never take it.
            update["$unset"] = {"activation": "", "password_reset": "", "email_change": ""}
        # The change's type depends on the state left (reactivated or unlocked), so one update per
        # such state; states sorted, so that every call tries them in the same order.
        for group in _change_groups(from_states, to):
            document = await self._users.find_one_and_update(
                {"_id": _object_id(user_id), "$or": [_STATE_FILTERS[state] for state in group], **_LIVE},
                _with_change(update, _state_change(group, to), now),
                return_document=ReturnDocument.BEFORE,
            )
            if document is not None:
                await self._publish(document["_id"])
                return _user_from_document(document)
        return None

    @storage_call
    async def set_role(self, user_id: str, role: Role, now: datetime) -> User | None:
        """Give the user ``role`` unless they have it; the user as it was before, or None if there is
        no such user or they had the role already. The token version is left to the caller, as in
        :meth:`change_state`."""
        document = await self._users.find_one_and_update(
            {"_id": _object_id(user_id), "role": {"$ne": role.value}, **_LIVE},
            _with_change({"$set": {"role": role.value, "updated_at": now}}, ChangeType.ROLE_CHANGED, now),
            return_document=ReturnDocument.BEFORE,
        )
        if document is None:
            return None
        await self._publish(document["_id"])
        return _user_from_document(document)

    @storage_call
    async def count_active_admins(self) -> int:
        # is_active is written with every state, and legacy documents without a state have it too.
        return await self._users.count_documents({"role": Role.ADMIN.value, "is_active": True})

    @storage_call
    async def take_admin_check(self, holder: str, lease_seconds: float) -> bool:
        """Hold the check that follows a removal of an active admin, for ``lease_seconds`` or until
        released; False while another holder's runs. One document of the ``leases`` collection, so
        the checks of every replica take turns (see :func:`users_grpc.services.last_admin.keep_an_active_admin`).
        Real time, whatever the service's clock: a lease outlives only a holder that died."""
        now = datetime.now(UTC)
        try:
            document = await self._leases.find_one_and_update(
                # Free (released, or its holder died) or already ours; the upsert makes the document once.
                {"_id": _ADMIN_CHECK_LEASE, "$or": [{"leased_until": {"$lt": now}}, {"holder": holder}]},
                {"$set": {"leased_until": now + timedelta(seconds=lease_seconds), "holder": holder, "taken_at": now}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return False  # the document exists and another holder's lease runs: the upsert's insert clashed
        return document is not None and document["holder"] == holder

    @storage_call
    async def release_admin_check(self, holder: str) -> None:
        await self._leases.update_one(
            {"_id": _ADMIN_CHECK_LEASE, "holder": holder}, {"$set": {"leased_until": _EPOCH}, "$unset": {"holder": ""}}
        )

    @storage_call
    async def delete_unless_active_admin(self, user_id: str) -> bool:
        """Delete the user if they are not an active admin (checked in the same operation)."""
        return await self._delete_where(
            {"_id": _object_id(user_id), "$or": [{"role": {"$ne": Role.ADMIN.value}}, {"is_active": False}]}
        )

    @storage_call
    async def bump_token_version(self, user_id: str, now: datetime) -> None:
        """End every access token so far, and any pending password reset or email change with them."""
        await self._users.update_one(
            {"_id": _object_id(user_id)},
            {
                "$inc": {"token_version": 1},
                "$set": {"updated_at": now},
                "$unset": {"password_reset": "", "email_change": ""},
            },
        )

    @storage_call
    async def list_users(self, filters: UserFilter, after_id: str | None, limit: int) -> list[User]:
        query = _user_query(filters)
        if after_id is not None:
            # The keyset: a page starts after the last id of the one before, however deep, and
            # neither inserts nor deletes elsewhere in the list move it.
            query = {"$and": [query, {"_id": {"$gt": _object_id(after_id)}}]}
        cursor = self._users.find(query).sort("_id", ASCENDING).limit(limit)
        return [_user_from_document(document) async for document in cursor]

    @storage_call
    async def count_users(self, filters: UserFilter) -> int:
        return await self._users.count_documents(_user_query(filters))

    @storage_call
    async def update_profile(
        self, user_id: str, changes: ProfileChanges, expected: Version | None, now: datetime
    ) -> User | None:
        fields: Document = {
            name: value.value if isinstance(value, Gender) else value
            for name, value in dataclasses.asdict(changes).items()
            if value is not None
        }
        if changes.username is not None:
            fields["username_key"] = identifier_key(changes.username)
        # Cleared by removing it, so that the sparse index keeps only the users that have one.
        unset = {"external_id": ""} if fields.get("external_id") == "" else {}
        fields = {name: value for name, value in fields.items() if name not in unset}
        query: Document = {"_id": _object_id(user_id), **_LIVE}
        if expected is not None:
            # Documents stored before revisions existed have none: revision 0.
            query["revision"] = expected.revision if expected.revision else {"$exists": False}
            query["updated_at"] = expected.updated_at
        change: Document = {"$set": {**fields, "updated_at": now}, "$inc": {"revision": 1}}
        if unset:
            change["$unset"] = unset
        update = _with_change(change, ChangeType.UPDATED, now)
        if changes.username is None:
            document = await self._users.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
        elif await self._claimed_update("username", fields["username_key"], query, update, now) is None:
            return None
        else:
            document = await self._users.find_one({"_id": query["_id"]})
        if document is None:
            return None
        await self._publish(document["_id"])
        return _user_from_document(document)

    async def _taken_field(self, document: Document, error: OperationFailure) -> str:
        # MongoDB names the clashing index in keyPattern; FerretDB does not, so look it up.
        key_pattern = (error.details or {}).get("keyPattern") or {}
        if "username_key" in key_pattern:
            return "username"
        if "email_key" in key_pattern:
            return "email"
        if await self._users.find_one({"username_key": document["username_key"]}, projection={"_id": 1}):
            return "username"
        return "email"


# The ``leases`` document that makes the checks after removals of active admins take turns.
_ADMIN_CHECK_LEASE = "active-admin-check"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _change_groups(from_states: frozenset[UserState], to: UserState) -> list[frozenset[UserState]]:
    if to is not UserState.ACTIVE:
        return [from_states]
    return [frozenset({state}) for state in sorted(from_states, key=lambda state: state.value)]


def _state_change(from_states: frozenset[UserState], to: UserState) -> ChangeType:
    if to is UserState.DEACTIVATED:
        return ChangeType.DEACTIVATED
    if to is UserState.LOCKED:
        return ChangeType.LOCKED
    if to is UserState.ACTIVE and from_states == {UserState.LOCKED}:
        return ChangeType.UNLOCKED
    if to is UserState.ACTIVE and from_states == {UserState.DEACTIVATED}:
        return ChangeType.REACTIVATED
    return ChangeType.ACTIVATED


def _user_query(filters: UserFilter) -> Document:
    clauses: list[Document] = [_LIVE]
    if filters.role is not None:
        clauses.append({"role": filters.role.value})
    if filters.state is not None:
        clauses.append(_STATE_FILTERS[filters.state])
    if filters.mfa_enabled is not None:
        clauses.append({"mfa.state": "active" if filters.mfa_enabled else {"$ne": "active"}})
    if filters.prefix_key:
        # Anchored and escaped: a prefix scan of the *_key indexes, never a pattern of the caller's.
        pattern = "^" + re.escape(filters.prefix_key)
        clauses.append({"$or": [{"username_key": {"$regex": pattern}}, {"email_key": {"$regex": pattern}}]})
    created: Document = {}
    if filters.created_after is not None:
        created["$gte"] = filters.created_after
    if filters.created_before is not None:
        created["$lt"] = filters.created_before
    if created:
        clauses.append({"created_at": created})
    if filters.metadata is not None:
        clauses.append(_metadata_clause(filters.metadata))
    if filters.external_id:
        clauses.append({"external_id": filters.external_id})
    return {"$and": clauses} if clauses else {}


def _identifier_filter(key: str) -> Document:
    return {"$or": [{"username_key": key}, {"email_key": key}], **_LIVE}


def _document_from_new_user(new_user: NewUser) -> Document:
    return {
        "_id": ObjectId(new_user.id),
        "username": new_user.username,
        "username_key": identifier_key(new_user.username),
        "first_name": new_user.first_name,
        "last_name": new_user.last_name,
        "email": new_user.email,
        "email_key": identifier_key(new_user.email),
        "gender": new_user.gender.value,
        "role": new_user.role.value,
        "is_active": new_user.is_active,
        "state": (UserState.ACTIVE if new_user.is_active else UserState.PENDING_ACTIVATION).value,
        "password_hash": new_user.password_hash,
        "activation": None if new_user.activation is None else _activation_document(new_user.activation),
        "created_at": new_user.created_at,
        "updated_at": new_user.created_at,
        "token_version": 0,
        # Absent, as in every document stored before it existed, when the server's default applies.
        **({"language_code": new_user.language_code} if new_user.language_code else {}),
        # Absent for our own scheme, as in every document stored before imports existed.
        **(
            {}
            if new_user.password_scheme is PasswordScheme.PEPPERED
            else {"password_scheme": new_user.password_scheme.value}
        ),
        **({"imported": True} if new_user.imported else {}),
        # An imported hash was set elsewhere, at a time unknown: its age counts from the import.
        "password_changed_at": new_user.created_at,
        **({"password_change_required": True} if new_user.password_change_required else {}),
        # Absent when empty: the sparse index holds only the users that have one.
        **({"external_id": new_user.external_id} if new_user.external_id else {}),
    }
