"""MongoDB storage through PyMongo's asyncio client; BSON stays inside this module.

Every state change is one conditional single-document update, with its
precondition in the filter, so concurrent requests and several replicas need
no transactions (FerretDB has none, and MongoDB needs none for this).

A change that the user must hear of (a password reset or change, MFA on or
off) pushes its notice into the user's own document in that same update: a
transactional outbox inside the aggregate. The mail sender moves pending
notices into the ``outbox`` collection (:meth:`MongoUserRepository.claim_pending_notices`).
A change that other services must hear of (the change feed) pushes its entry into the
user's document the same way; :class:`MongoChangeLog` publishes entries into ``user_changes``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import bson
import pymongo
from bson import ObjectId
from cryptography.exceptions import InvalidTag
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from users_grpc.domain import (
    Account,
    ActivationCode,
    ActorKind,
    AuditActor,
    AuditEvent,
    AuditEventType,
    AuditFilter,
    AuditPosition,
    ChangeType,
    Gender,
    Mail,
    Mfa,
    NewUser,
    Notice,
    PasswordScheme,
    PendingEmailChange,
    PendingNotices,
    ProfileChanges,
    QueuedMail,
    Role,
    ServiceAccount,
    Session,
    StoredKey,
    Tally,
    User,
    UserChange,
    UserFilter,
    UserState,
    Version,
    identifier_key,
)
from users_grpc.errors import AlreadyExists, StorageUnavailable
from users_grpc.secrets_at_rest import SecretsAtRest

Document = dict[str, Any]
_INDEX_NOT_FOUND = 27
log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class DatabaseBudget:
    """How long one call's database work may take: each repository call at most
    ``per_operation`` seconds, and none past the call's ``deadline`` (``time.monotonic()``).

    Per operation, not per call: time a call spends hashing a password or waiting for a
    hashing thread must not eat into its database time, or a busy server would report a
    healthy database as unavailable.
    """

    per_operation: float
    deadline: float | None = None

    def seconds(self) -> float:
        if self.deadline is None:
            return self.per_operation
        return max(min(self.per_operation, self.deadline - time.monotonic()), 0.001)


database_budget: ContextVar[DatabaseBudget | None] = ContextVar("database_budget", default=None)
"""Set by the interceptor for each call; outside calls the client's own timeout applies."""


# Database work whose call was cancelled (a deadline passed, the client went away) while it ran:
# held here until it ends on its own, within its budget (see _storage_errors).
_abandoned: set[asyncio.Future[Any]] = set()
# Beyond this many (PyMongo's default pool size), abandoned work is cancelled as before: callers
# that cancel call after call must not pile up work the concurrency limit no longer counts.
_MOST_ABANDONED = 100


def _forget_abandoned(work: asyncio.Future[Any]) -> None:
    _abandoned.discard(work)
    if not work.cancelled():
        work.exception()  # nobody awaits it any more: its outcome was reported to no one


async def cancel_abandoned_work() -> None:
    """Cancel this loop's abandoned database work (at shutdown, before the client closes under
    it): no one waits for its outcome."""
    loop = asyncio.get_running_loop()
    mine = [work for work in list(_abandoned) if work.get_loop() is loop]
    for work in mine:
        work.cancel()
    if mine:
        await asyncio.wait(mine, timeout=1)


def _storage_errors(method: Callable[_P, Coroutine[Any, Any, _R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Bound the call by the current :data:`database_budget`, and turn an unreachable or
    timed-out database into :class:`StorageUnavailable`.

    Within a call, the work is shielded from the call's cancellation and ends at its budget
    instead (PyMongo's own timeout, which the budget keeps within the call's deadline).
    Cancelling PyMongo mid-operation throws its connection away, and mid-connect leaks the
    socket (PyMongo 4.20, PYTHON-5867): a client giving up should cost neither.

    Other PyMongo errors are bugs and propagate as they are.
    """

    async def bounded(budget: DatabaseBudget | None, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            if budget is None:
                return await method(*args, **kwargs)
            with pymongo.timeout(budget.seconds()):
                return await method(*args, **kwargs)
        except PyMongoError as error:
            if isinstance(error, ConnectionFailure) or error.timeout:
                raise StorageUnavailable() from error
            raise

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        budget = database_budget.get()
        if budget is None:  # background work, which stops only when the server does
            return await bounded(None, *args, **kwargs)
        work = asyncio.ensure_future(bounded(budget, *args, **kwargs))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if len(_abandoned) >= _MOST_ABANDONED:
                work.cancel()
            _abandoned.add(work)
            work.add_done_callback(_forget_abandoned)
            raise

    return wrapper


# The ``leases`` document that makes the checks after removals of active admins take turns.
_ADMIN_CHECK_LEASE = "active-admin-check"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MongoUserRepository:
    """The ``users`` collection. Usernames and emails are unique through :class:`MongoClaims`, which
    works when ``users`` is sharded by ``_id`` (a unique index on another field would not)."""

    def __init__(self, database: AsyncDatabase[Document], changes: MongoChangeLog | None = None) -> None:
        self._users: AsyncCollection[Document] = database["users"]
        self._leases: AsyncCollection[Document] = database["leases"]
        self._claims = MongoClaims(database)
        self._changes = changes or MongoChangeLog(database)
        # Set from the schema version at start-up: only from version 2 does every user's name
        # have a claim (older replicas may write users without one until then).
        self.lookups_by_claim = False

    @_storage_errors
    async def ensure_indexes(self) -> None:
        """The indexes every schema version has; the identifier indexes belong to :class:`MongoSchema`."""
        await self._claims.ensure_indexes()
        await self._changes.ensure_indexes()
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

    def new_id(self) -> str:
        return str(ObjectId())

    @_storage_errors
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

    @_storage_errors
    async def get(self, user_id: str) -> User | None:
        document = await self._live_by_id(_object_id(user_id))
        return None if document is None else _user_from_document(document)

    @_storage_errors
    async def find_account(self, identifier_key: str) -> Account | None:
        document = await self._find_by_identifier(identifier_key)
        return None if document is None else _account_from_document(document)

    async def _live_by_id(self, user_id: ObjectId | str) -> Document | None:
        """The user with this ``_id`` unless it is being deleted."""
        return await self._users.find_one({"_id": user_id, **_LIVE})

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

    @_storage_errors
    async def reserve_activation_attempt(self, user_id: str, now: datetime) -> ActivationCode | None:
        document = await self._users.find_one_and_update(
            {
                "_id": _object_id(user_id),
                "is_active": False,
                "activation.expires_at": {"$gt": now},
                "activation.attempts_left": {"$gt": 0},
            },
            {"$inc": {"activation.attempts_left": -1}},
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else _activation_from_document(document["activation"])

    @_storage_errors
    async def activate(self, user_id: str, code_digest: str, now: datetime) -> User | None:
        return await self._activate_if(
            user_id, {"activation.digest": code_digest, "activation.expires_at": {"$gt": now}}, now
        )

    @_storage_errors
    async def activate_with_token(self, user_id: str, token_digest: str, now: datetime) -> User | None:
        return await self._activate_if(
            user_id, {"activation.token_digest": token_digest, "activation.token_expires_at": {"$gt": now}}, now
        )

    async def _activate_if(self, user_id: str, proof: Document, now: datetime) -> User | None:
        """Activate a pending user if ``proof`` (an unexpired code or token) matches; works once."""
        document = await self._users.find_one_and_update(
            {"_id": _object_id(user_id), "is_active": False, **proof, **_LIVE},
            _with_change(
                {
                    "$set": {"is_active": True, "state": UserState.ACTIVE.value, "updated_at": now},
                    "$unset": {"activation": ""},
                },
                ChangeType.ACTIVATED,
                now,
            ),
            return_document=ReturnDocument.AFTER,
        )
        if document is None:
            return None
        await self._publish(document["_id"])
        return _user_from_document(document)

    @_storage_errors
    async def replace_activation_code(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        return await self._replace_code("activation", _NEVER_ACTIVATED, user_id, code, max_sends, window_seconds)

    @_storage_errors
    async def replace_password_reset(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        return await self._replace_code("password_reset", {"is_active": True}, user_id, code, max_sends, window_seconds)

    async def _replace_code(
        self,
        field: str,
        precondition: Document,
        user_id: str,
        code: ActivationCode,
        max_sends: int,
        window_seconds: int,
        extra: Document | None = None,
        notice: Mail | None = None,
    ) -> bool:
        """Pend ``code`` in ``field``, replacing any older one, unless the sends in the window hit the cap.

        ``extra`` holds more fields of the pending ``field`` sub-document, set with the code;
        ``notice`` is pended in the same update (see the module docstring).
        """

        def noticed(update: Document) -> Document:
            return update if notice is None else _with_notice(update, notice, code.window_started_at)

        fields = {**_activation_document(code), **(extra or {})}
        window_cutoff = code.window_started_at - timedelta(seconds=window_seconds)
        pending = {"_id": _object_id(user_id), **precondition}
        # Within the running window: count one more send, if the cap allows.
        counted = await self._users.update_one(
            {
                **pending,
                f"{field}.window_started_at": {"$gt": window_cutoff},
                f"{field}.sends_in_window": {"$lt": max_sends},
            },
            noticed(
                {
                    "$set": {
                        f"{field}.{name}": value
                        for name, value in fields.items()
                        if name not in {"sends_in_window", "window_started_at"}
                    },
                    "$inc": {f"{field}.sends_in_window": 1},
                }
            ),
        )
        if counted.modified_count:
            return True
        # The window has run out (or there was none): this send opens a new one.
        opened = await self._users.update_one(
            {**pending, "$or": [{f"{field}.window_started_at": {"$lte": window_cutoff}}, {field: None}]},
            noticed({"$set": {field: fields}}),
        )
        return opened.modified_count == 1

    @_storage_errors
    async def find_account_by_reset_digest(self, user_id: str, digest: str, now: datetime) -> Account | None:
        # By _id: the token names its user, so the lookup goes to one shard and one index entry.
        document = await self._users.find_one(
            {
                "_id": _object_id(user_id),
                "password_reset.digest": digest,
                "password_reset.expires_at": {"$gt": now},
                "is_active": True,
            }
        )
        return None if document is None else _account_from_document(document)

    @_storage_errors
    async def reset_password(self, user_id: str, digest: str, password_hash: str, now: datetime, notice: Mail) -> bool:
        """Set the password if this reset token is still pending and unexpired; it works once.

        ``notice`` is pended in the same update: the reset and its notice happen together or not at all.
        """
        result = await self._users.update_one(
            {
                "_id": _object_id(user_id),
                "password_reset.digest": digest,
                "password_reset.expires_at": {"$gt": now},
                **_LIVE,
            },
            _with_notice(_new_password(password_hash, now), notice, now),
        )
        return result.modified_count == 1

    @_storage_errors
    async def set_password(self, user_id: str, password_hash: str, now: datetime, notice: Mail) -> bool:
        """Set a new password, with its notice; a pending reset token dies with the old password."""
        result = await self._users.update_one(
            # Never on a user being deleted: its notices have been moved to the outbox already.
            {"_id": _object_id(user_id), **_LIVE},
            _with_notice(_new_password(password_hash, now), notice, now),
        )
        return result.modified_count == 1

    @_storage_errors
    async def upgrade_password_hash(self, user_id: str, old_hash: str, new_hash: str) -> bool:
        # The same password under our scheme: no token needs to die, and the profile did not change.
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "password_hash": old_hash, "password_scheme": PasswordScheme.BCRYPT.value},
            {"$set": {"password_hash": new_hash}, "$unset": {"password_scheme": ""}},
        )
        return result.modified_count == 1

    @_storage_errors
    async def get_account(self, user_id: str) -> Account | None:
        document = await self._live_by_id(_object_id(user_id))
        return None if document is None else _account_from_document(document)

    @_storage_errors
    async def sealed_totp_secrets(self, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        """One page, by ``_id`` (its index serves it), of (user id, sealed TOTP secret) after ``after``."""
        query: Document = {} if after is None else {"_id": {"$gt": ObjectId(after)}}
        cursor = self._users.find(query, {"mfa.sealed_secret": 1}).sort("_id", ASCENDING).limit(limit)
        page = []
        async for document in cursor:
            sealed = (document.get("mfa") or {}).get("sealed_secret")
            page.append((str(document["_id"]), b"" if sealed is None else bytes(sealed)))
        return page

    @_storage_errors
    async def reseal_totp_secret(self, user_id: str, sealed: bytes, resealed: bytes) -> bool:
        """Replace the sealed TOTP secret, unless it changed since it was read as ``sealed``."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.sealed_secret": sealed}, {"$set": {"mfa.sealed_secret": resealed}}
        )
        return result.modified_count == 1

    @_storage_errors
    async def start_mfa_enrollment(self, user_id: str, sealed_secret: bytes, now: datetime) -> bool:
        """Pend a new TOTP secret unless MFA is already on."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": {"$ne": "active"}},
            {
                "$set": {
                    "mfa": {
                        "state": "pending",
                        "sealed_secret": sealed_secret,
                        "last_used_step": -1,
                        "recovery_digests": [],
                        "failures": 0,
                        "failure_window_start": None,
                    },
                    "updated_at": now,
                }
            },
        )
        return result.modified_count == 1

    @_storage_errors
    async def confirm_mfa(
        self, user_id: str, step: int, recovery_digests: list[str], now: datetime, notice: Mail
    ) -> bool:
        """Turn a pending enrollment on, with its notice, if ``step`` is newer than the last used."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "pending", "mfa.last_used_step": {"$lt": step}, **_LIVE},
            _with_change(
                _with_notice(
                    {
                        "$set": {
                            "mfa.state": "active",
                            "mfa.last_used_step": step,
                            "mfa.recovery_digests": recovery_digests,
                            "mfa.failures": 0,
                            "updated_at": now,
                        },
                        "$inc": {"token_version": 1},
                    },
                    notice,
                    now,
                ),
                ChangeType.UPDATED,
                now,
            ),
        )
        return await self._published_if(result.modified_count == 1, user_id)

    @_storage_errors
    async def use_totp_step(self, user_id: str, step: int) -> bool:
        """Record ``step`` as used if it is newer than the last one: each code works once."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active", "mfa.last_used_step": {"$lt": step}},
            {"$set": {"mfa.last_used_step": step, "mfa.failures": 0}},
        )
        return result.modified_count == 1

    @_storage_errors
    async def use_recovery_code(self, user_id: str, digest: str) -> bool:
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active", "mfa.recovery_digests": digest},
            {"$pull": {"mfa.recovery_digests": digest}, "$set": {"mfa.failures": 0}},
        )
        return result.modified_count == 1

    @_storage_errors
    async def replace_recovery_codes(self, user_id: str, digests: list[str]) -> bool:
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active"}, {"$set": {"mfa.recovery_digests": digests}}
        )
        return result.modified_count == 1

    @_storage_errors
    async def disable_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        """Turn MFA off, with its notice; False if it was not on."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa.state": "active", **_LIVE},
            _mfa_removed(notice, now),
        )
        return await self._published_if(result.modified_count == 1, user_id)

    @_storage_errors
    async def reset_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        """Remove any enrollment, active or pending, with its notice (an admin's reset); False if none."""
        result = await self._users.update_one(
            {"_id": _object_id(user_id), "mfa": {"$ne": None}, **_LIVE},
            _mfa_removed(notice, now),
        )
        return await self._published_if(result.modified_count == 1, user_id)

    @_storage_errors
    async def reserve_mfa_attempt(self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int) -> bool:
        """Count one second-factor attempt; False once ``max_attempts`` fell in the window."""
        # Only within an enrollment: a counter alone must not make an "mfa" sub-document.
        return await self._reserve_attempt("mfa", user_id, now, max_attempts, window_seconds, {"mfa": {"$ne": None}})

    async def _reserve_attempt(
        self,
        field: str,
        user_id: str,
        now: datetime,
        max_attempts: int,
        window_seconds: int,
        precondition: Document | None = None,
    ) -> bool:
        """Count an attempt in ``field`` (failures, failure_window_start) within a window, up to a cap.

        Counted before the secret is compared, so parallel guesses cannot exceed the cap; a
        success sets failures back to 0.
        """
        cutoff = now - timedelta(seconds=window_seconds)
        counted = await self._users.update_one(
            {
                "_id": _object_id(user_id),
                f"{field}.failure_window_start": {"$gt": cutoff},
                f"{field}.failures": {"$lt": max_attempts},
            },
            {"$inc": {f"{field}.failures": 1}},
        )
        if counted.modified_count:
            return True
        # The window ran out, or none was open yet: this attempt opens one.
        opened = await self._users.update_one(
            {
                "_id": _object_id(user_id),
                **(precondition or {}),
                "$or": [{f"{field}.failure_window_start": {"$lte": cutoff}}, {f"{field}.failure_window_start": None}],
            },
            {"$set": {f"{field}.failures": 1, f"{field}.failure_window_start": now}},
        )
        return opened.modified_count == 1

    @_storage_errors
    async def delete(self, user_id: str) -> bool:
        return await self._delete_where({"_id": _object_id(user_id)})

    @_storage_errors
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

    async def _publish(self, user_id: ObjectId | str) -> None:
        """Publish the user's pending changes now, the fast path; the change log's sweep publishes
        whatever this leaves (the database went away, the call was cut short, the server died)."""
        try:
            await self._changes.publish(str(user_id))
        except (PyMongoError, StorageUnavailable):
            log.warning("changes left for the sweep", extra={"user_id": str(user_id)}, exc_info=True)

    async def _published_if(self, changed: bool, user_id: str) -> bool:
        if changed:
            await self._publish(user_id)
        return changed

    @_storage_errors
    async def change_state(
        self, user_id: str, *, from_states: frozenset[UserState], to: UserState, now: datetime
    ) -> User | None:
        """Move the user from one of ``from_states`` to ``to`` in one conditional update; the user as
        it was before, or None if it was in no such state. The token version is left to the caller,
        which may still have to undo the change (see :func:`users_grpc.service.keep_an_active_admin`)."""
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

    @_storage_errors
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

    @_storage_errors
    async def count_active_admins(self) -> int:
        # is_active is written with every state, and legacy documents without a state have it too.
        return await self._users.count_documents({"role": Role.ADMIN.value, "is_active": True})

    @_storage_errors
    async def take_admin_check(self, holder: str, lease_seconds: float) -> bool:
        """Hold the check that follows a removal of an active admin, for ``lease_seconds`` or until
        released; False while another holder's runs. One document of the ``leases`` collection, so
        the checks of every replica take turns (see :func:`users_grpc.service.keep_an_active_admin`).
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

    @_storage_errors
    async def release_admin_check(self, holder: str) -> None:
        await self._leases.update_one(
            {"_id": _ADMIN_CHECK_LEASE, "holder": holder}, {"$set": {"leased_until": _EPOCH}, "$unset": {"holder": ""}}
        )

    @_storage_errors
    async def delete_unless_active_admin(self, user_id: str) -> bool:
        """Delete the user if they are not an active admin (checked in the same operation)."""
        return await self._delete_where(
            {"_id": _object_id(user_id), "$or": [{"role": {"$ne": Role.ADMIN.value}}, {"is_active": False}]}
        )

    @_storage_errors
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

    @_storage_errors
    async def claim_pending_notices(self, now: datetime, lease_seconds: float) -> PendingNotices | None:
        """Claim, for ``lease_seconds``, the notices waiting in one user's document; None if none wait.

        A claim keeps other senders off this document's notices until it is released or its
        lease runs out (its sender died): then another sender takes them over.
        """
        claim = secrets.token_hex(16)
        document = await self._users.find_one_and_update(
            {"pending_mail_since": {"$lte": now}, **_unclaimed(now)},
            {"$set": {"pending_mail_claim": {"token": claim, "until": now + timedelta(seconds=lease_seconds)}}},
            sort=[("pending_mail_since", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        if document is None:
            return None
        return PendingNotices(
            user_id=str(document["_id"]),
            claim=claim,
            notices=tuple(_notice_from_document(n) for n in document.get("pending_mail") or ()),
        )

    @_storage_errors
    async def release_notices(self, pending: PendingNotices) -> None:
        """Drop the claimed notices, which the outbox holds now, and end the claim."""
        user_id = ObjectId(pending.user_id)
        await self._users.update_one(
            {"_id": user_id, "pending_mail_claim.token": pending.claim},
            {
                # Whole elements, as written: FerretDB's $pull takes no conditions.
                "$pullAll": {"pending_mail": [_notice_document(n) for n in pending.notices]},
                "$unset": {"pending_mail_claim": ""},
            },
        )
        await self._drop_empty_notices(user_id)

    @_storage_errors
    async def settle_notice(self, user_id: str, notice_id: str, now: datetime) -> datetime | None:
        """Before its outbox copy goes out: make sure the notice no longer waits in its user's document.

        Otherwise a sender that moved it, then died before dropping it, would leave it to be moved
        (and mailed) again once its outbox copy is gone. None when settled; else the time until
        which a live claim holds the notice (its sender is moving it; try again then).
        """
        notice = _object_id(notice_id)
        # Twice at most: a sender may claim the document between the read and the pull.
        for _ in range(2):
            document = await self._users.find_one(
                {"_id": _object_id(user_id), "pending_mail.id": notice},
                projection={"pending_mail": 1, "pending_mail_claim": 1},
            )
            if document is None:
                return None  # the common case: moved and dropped already
            claimed_until = _live_claim(document, now)
            if claimed_until is not None:
                return claimed_until
            await self._users.update_one(
                {"_id": document["_id"], **_unclaimed(now)},
                {"$pullAll": {"pending_mail": [n for n in document["pending_mail"] if n.get("id") == notice]}},
            )
            await self._drop_empty_notices(document["_id"])
        return None

    async def _drop_empty_notices(self, user_id: ObjectId) -> None:
        # Conditional on emptiness in the same update: a notice pushed meanwhile keeps the fields.
        await self._users.update_one(
            {"_id": user_id, "pending_mail": {"$size": 0}}, {"$unset": {"pending_mail": "", "pending_mail_since": ""}}
        )

    @_storage_errors
    async def pend_email_change(
        self,
        user_id: str,
        change: PendingEmailChange,
        *,
        max_sends: int,
        window_seconds: int,
        notice: Mail | None = None,
    ) -> bool:
        return await self._replace_code(
            "email_change",
            {"is_active": True, **_LIVE},
            user_id,
            change.code,
            max_sends,
            window_seconds,
            extra={"new_email": change.new_email},
            notice=notice,
        )

    @_storage_errors
    async def reserve_email_change_attempt(self, user_id: str, now: datetime) -> PendingEmailChange | None:
        document = await self._users.find_one_and_update(
            {
                "_id": _object_id(user_id),
                "is_active": True,
                "email_change.expires_at": {"$gt": now},
                "email_change.attempts_left": {"$gt": 0},
            },
            {"$inc": {"email_change.attempts_left": -1}},
            return_document=ReturnDocument.AFTER,
        )
        if document is None:
            return None
        pending = document["email_change"]
        return PendingEmailChange(new_email=pending["new_email"], code=_activation_from_document(pending))

    @_storage_errors
    async def confirm_email_change(
        self, user_id: str, new_email: str, code_digest: str, now: datetime, notice: Mail | None = None
    ) -> tuple[User, User] | None:
        return await self._swap_email(
            {
                "_id": _object_id(user_id),
                "is_active": True,
                "email_change.new_email": new_email,
                "email_change.digest": code_digest,
                "email_change.expires_at": {"$gt": now},
            },
            new_email,
            now,
            notice,
        )

    @_storage_errors
    async def set_email(
        self, user_id: str, email: str, now: datetime, notice: Mail | None = None
    ) -> tuple[User, User] | None:
        return await self._swap_email({"_id": _object_id(user_id)}, email, now, notice)

    async def _swap_email(
        self, precondition: Document, email: str, now: datetime, notice: Mail | None
    ) -> tuple[User, User] | None:
        """Claim ``email``, then set it where ``precondition`` holds: a taken address writes
        nothing and raises :class:`AlreadyExists`. The old address is released afterwards.

        The pending change goes, and so does a pending password reset: its token was mailed to
        the old address, which no longer speaks for the account. ``notice`` (to the old address)
        is pended in the same update, which then applies only while ``notice.to`` is still the
        user's address: so the notice never goes to an address that was not the one replaced.
        """
        key = identifier_key(email)
        update: Document = {
            "$set": {"email": email, "email_key": key, "updated_at": now},
            "$unset": {"email_change": "", "password_reset": ""},
        }
        query = {**precondition, **_LIVE}
        if notice is not None:
            update = _with_notice(update, notice, now)
            query["email"] = notice.to
        before = await self._claimed_update(
            "email", key, query, _with_change(update, ChangeType.EMAIL_CHANGED, now), now
        )
        if before is None:
            return None
        await self._publish(before["_id"])
        old = _user_from_document(before)
        # As stored and read back later: BSON dates hold milliseconds.
        stored_now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        return old, dataclasses.replace(old, email=email, updated_at=stored_now)

    @_storage_errors
    async def list_users(self, filters: UserFilter, after_id: str | None, limit: int) -> list[User]:
        query = _user_query(filters)
        if after_id is not None:
            # The keyset: a page starts after the last id of the one before, however deep, and
            # neither inserts nor deletes elsewhere in the list move it.
            query = {"$and": [query, {"_id": {"$gt": _object_id(after_id)}}]}
        cursor = self._users.find(query).sort("_id", ASCENDING).limit(limit)
        return [_user_from_document(document) async for document in cursor]

    @_storage_errors
    async def count_users(self, filters: UserFilter) -> int:
        return await self._users.count_documents(_user_query(filters))

    @_storage_errors
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
        query: Document = {"_id": _object_id(user_id), **_LIVE}
        if expected is not None:
            # Documents stored before revisions existed have none: revision 0.
            query["revision"] = expected.revision if expected.revision else {"$exists": False}
            query["updated_at"] = expected.updated_at
        update = _with_change({"$set": {**fields, "updated_at": now}, "$inc": {"revision": 1}}, ChangeType.UPDATED, now)
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

    async def _claimed_update(
        self, kind: str, key: str, query: Document, update: Document, now: datetime
    ) -> Document | None:
        """Claim ``key`` for the user ``query`` names, apply ``update`` where ``query`` holds, then
        release the key the user held before; the document before the update, or None if
        ``query`` matched nothing (the claim is then given back)."""
        user_id = query["_id"]
        claim = await self._claims.claim(kind, key, user_id, now)
        if claim is None:
            raise AlreadyExists(kind)
        refused = False
        try:
            before = await self._users.find_one_and_update(query, update, return_document=ReturnDocument.BEFORE)
        except OperationFailure as error:
            if not _is_duplicate_key(error):
                raise
            before, refused = None, True  # a unique index left from schema 1 refused it
        if before is None:
            if claim is Claim.NEW:
                await self._claims.release(kind, key, user_id)
            if refused:
                raise AlreadyExists(kind)
            return None
        await self._claims.settle(kind, key, user_id)
        if before.get(f"{kind}_key") != key:
            await self._claims.release(kind, before[f"{kind}_key"], user_id)
        return before

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


class Claim(enum.Enum):
    NEW = "new"  # claimed by this call: give it back if the change fails
    HELD = "held"  # the user held it already (a rename that changes only letter case)


# Longer than any write between a claim and its user's document may take (the database budget
# of one call is at most USERS_DB_TIMEOUT_SECONDS): a younger claim may still be in use.
CLAIM_SETTLE_SECONDS = 120.0
_CLAIM_KINDS = ("username", "email")


def claim_documents(user: Document, now: datetime) -> list[Document]:
    """The settled claims on a user document's names: for tools that write users straight into the
    database (benchmarks seeding many users), which must claim their names as the service does."""
    return [
        {"_id": f"{kind}:{user[f'{kind}_key']}", "user_id": user["_id"], "claimed_at": now} for kind in _CLAIM_KINDS
    ]


class MongoClaims:
    """The ``claims`` collection: one document per normalized username and email, its ``_id``
    ``"<kind>:<key>"``, naming the user that holds it.

    This is MongoDB's pattern for uniqueness outside a sharded collection's shard key: the
    unique ``_id`` of an unsharded (or ``_id``-sharded) collection decides every race, one
    insert at a time, without transactions. A claim is pending from its insert until its
    user's document is written; :meth:`release_stale` settles or frees pending claims past
    :data:`CLAIM_SETTLE_SECONDS` by whether the user holds the key, and a claimant that meets
    a settled claim whose user no longer holds the key (a deletion that died halfway) takes it
    over after the same bound.
    """

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._claims: AsyncCollection[Document] = database["claims"]
        self._users: AsyncCollection[Document] = database["users"]

    async def ensure_indexes(self) -> None:
        # Sparse: only claims still pending are indexed, for release_stale.
        await self._claims.create_index([("pending_since", ASCENDING)], sparse=True, name="pending_since")

    async def claim(self, kind: str, key: str, user_id: ObjectId, now: datetime) -> Claim | None:
        """Claim ``key`` for ``user_id``; None if another user holds it."""
        claim_id = f"{kind}:{key}"
        for _ in range(3):  # a claim released between our insert and our read: try again
            try:
                await self._claims.insert_one(
                    {"_id": claim_id, "user_id": user_id, "claimed_at": now, "pending_since": now}
                )
                return Claim.NEW
            except DuplicateKeyError:
                existing = await self._claims.find_one({"_id": claim_id})
            if existing is None:
                continue
            if existing["user_id"] == user_id:
                return Claim.HELD
            young = existing["claimed_at"] > now - timedelta(seconds=CLAIM_SETTLE_SECONDS)
            if young or await self._holds(existing["user_id"], kind, key):
                return None
            taken_over = await self._claims.find_one_and_update(
                {"_id": claim_id, "user_id": existing["user_id"], "claimed_at": existing["claimed_at"]},
                {"$set": {"user_id": user_id, "claimed_at": now, "pending_since": now}},
            )
            return Claim.NEW if taken_over is not None else None
        return None

    async def holder(self, kind: str, key: str) -> Any:
        """The id of the user claiming ``key``, or None."""
        claim = await self._claims.find_one({"_id": f"{kind}:{key}"}, projection={"user_id": 1})
        return None if claim is None else claim["user_id"]

    async def _holds(self, user_id: Any, kind: str, key: str) -> bool:
        # By _id alone, the key compared here: the embedded FerretDB uses an index only for that filter.
        document = await self._users.find_one({"_id": user_id}, projection={f"{kind}_key": 1})
        return document is not None and document.get(f"{kind}_key") == key

    async def settle(self, kind: str, key: str, user_id: ObjectId) -> None:
        await self._claims.update_one({"_id": f"{kind}:{key}", "user_id": user_id}, {"$unset": {"pending_since": ""}})

    async def release(self, kind: str, key: str, user_id: Any) -> None:
        await self._claims.delete_one({"_id": f"{kind}:{key}", "user_id": user_id})

    async def release_all_of(self, user: Document) -> None:
        for kind in _CLAIM_KINDS:
            if f"{kind}_key" in user:
                await self.release(kind, user[f"{kind}_key"], user["_id"])

    @_storage_errors
    async def release_stale(self, now: datetime, limit: int = 1000) -> int:
        """Settle pending claims older than the bound whose user holds them; release the others."""
        released = 0
        cutoff = now - timedelta(seconds=CLAIM_SETTLE_SECONDS)
        async for claim in self._claims.find({"pending_since": {"$lt": cutoff}}).limit(limit):
            kind, _, key = claim["_id"].partition(":")
            if await self._holds(claim["user_id"], kind, key):
                await self.settle(kind, key, claim["user_id"])
            else:
                result = await self._claims.delete_one(
                    {"_id": claim["_id"], "user_id": claim["user_id"], "claimed_at": claim["claimed_at"]}
                )
                released += result.deleted_count
        return released

    @_storage_errors
    async def backfill(self, after: Any, limit: int, now: datetime) -> tuple[Any, list[str]]:
        """Claim the names of up to ``limit`` users after ``after`` (in ``_id`` order) for them: the
        last ``_id`` done (None when no user is left) and the names another user holds already."""
        query: Document = {} if after is None else {"_id": {"$gt": after}}
        last, conflicts = None, []
        cursor = self._users.find(query, projection={"username_key": 1, "email_key": 1}).sort("_id", ASCENDING)
        async for user in cursor.limit(limit):
            last = user["_id"]
            for kind in _CLAIM_KINDS:
                key = user.get(f"{kind}_key")
                if key is None:
                    continue
                claim = await self._claims.find_one_and_update(
                    {"_id": f"{kind}:{key}"},
                    {"$setOnInsert": {"user_id": user["_id"], "claimed_at": now}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                if claim is not None and claim["user_id"] != user["_id"]:
                    conflicts.append(f"{kind} of user {user['_id']} is claimed by user {claim['user_id']}")
        return last, conflicts


class MongoSchema:
    """The ``schema`` collection: which version of this module's layout the database holds, and the
    progress of a migration under way. See :mod:`users_grpc.migrations`."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._schema: AsyncCollection[Document] = database["schema"]
        self._users: AsyncCollection[Document] = database["users"]
        self.claims = MongoClaims(database)

    @_storage_errors
    async def state(self) -> Document | None:
        return await self._schema.find_one({"_id": "users"})

    @_storage_errors
    async def has_users(self) -> bool:
        return await self._users.find_one({}, projection={"_id": 1}) is not None

    @_storage_errors
    async def record(self, version: int, **progress: Any) -> None:
        """Record ``version`` (never lowering it), with the progress of the next step, if any."""
        update: Document = {"$max": {"version": version}}
        if progress:
            update["$set"] = progress
        else:
            update["$unset"] = {"progress": ""}
        await self._schema.update_one({"_id": "users"}, update, upsert=True)

    @_storage_errors
    async def ensure_identifier_indexes(self, *, unique: bool) -> None:
        """The lookups by username and email. Unique before schema 2; plain from then on, since
        claims keep the names unique and a unique index cannot exist on a sharded ``users``."""
        for field in ("username_key", "email_key"):
            if unique:
                await self._users.create_index([(field, ASCENDING)], unique=True, name=f"{field}_unique")
            else:
                await self._users.create_index([(field, ASCENDING)], name=field)

    @_storage_errors
    async def drop_unique_identifier_indexes(self) -> None:
        for field in ("username_key", "email_key"):
            try:
                await self._users.drop_index(f"{field}_unique")
            except OperationFailure as error:
                if error.code != _INDEX_NOT_FOUND:
                    raise


class MongoChangeLog:
    """The change feed's store: the ``user_changes`` collection, one document per change, its
    ``_id`` the change's place in one dense global sequence (1, 2, 3, ...).

    Why a reader that reads ``_id > cursor`` in order never skips a change:

    1. A change and its pending entry are one single-document update of the user (see
       ``_with_change``): no change without its entry, whatever crashes or cancellations.
    2. An entry is published by inserting it at the next number: starting from the head (a
       number known stored: ``user_changes_head``, moved up after each insert), a publisher
       tries n + 1, and on finding it taken (the unique ``_id``) the next, and so on. So an
       insert at n succeeds only after every number below n was found stored: the sequence has
       no holes, and a change can never appear later below a cursor already passed. (A counter
       handing numbers out would not do: a publisher dying between taking a number and
       inserting would leave a hole, and a reader cannot tell a hole from a change still on
       its way.) Readers also deliver only consecutive numbers, each read by its ``_id``.
    3. The unique (user_id, number) index makes publishing an entry twice (two publishers, or
       one that died before removing the entry) a no-op; entries are removed from the user's
       document only after they are published, and are published in the user's own order.
    4. Retention deletes only a prefix of the sequence and always keeps the newest change, so
       the maximum never goes back; a cursor below what is kept is refused, never skipped.
    5. A deleted user's document keeps its entries until they are published: a deletion first
       marks the document (``deleting``; every call sees the user as gone from then on), then
       publishes, moves the user's pending notices to the outbox, and only then deletes it.
    """

    def __init__(self, database: AsyncDatabase[Document], outbox: MongoOutbox | None = None) -> None:
        self._changes: AsyncCollection[Document] = database["user_changes"]
        # One document: the highest number known stored, so publishers need not look for the maximum.
        self._heads: AsyncCollection[Document] = database["user_changes_head"]
        self._users: AsyncCollection[Document] = database["users"]
        self._outbox = outbox
        self._claims = MongoClaims(database)
        # Called after this process published changes, so that its own watchers need not wait for a poll.
        self.on_published: Callable[[], None] | None = None

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._changes.create_index(
            [("user_id", ASCENDING), ("number", ASCENDING)], unique=True, name="user_id_number_unique"
        )
        # Serves housekeeping's purge by age.
        await self._changes.create_index([("published_at", ASCENDING)], name="published_at")
        # Sparse: only documents with changes waiting, or being deleted, are indexed; the sweep reads these.
        await self._users.create_index(
            [("pending_changes_since", ASCENDING)], sparse=True, name="pending_changes_since"
        )
        await self._users.create_index([("deleting", ASCENDING)], sparse=True, name="deleting")

    @_storage_errors
    async def publish(self, user_id: str) -> None:
        """Publish the user's pending changes in their order; finish the user's deletion if it is marked."""
        await self._publish(_object_id(user_id))

    @_storage_errors
    async def sweep(self, changed_before: datetime, limit: int = 100) -> int:
        """Publish what waits since before ``changed_before`` (what a publisher that died left), and
        finish deletions marked before then; how many users it took up (at most ``limit`` of each)."""
        ids: dict[Any, None] = {}
        for query in ({"pending_changes_since": {"$lte": changed_before}}, {"deleting": {"$lte": changed_before}}):
            async for document in self._users.find(query, projection={"_id": 1}).limit(limit):
                ids[document["_id"]] = None
        for user_id in ids:
            await self._publish(user_id)
        return len(ids)

    @_storage_errors
    async def last_sequence(self) -> int:
        """The newest change's sequence number; 0 before the first change."""
        return await self._last_sequence()

    @_storage_errors
    async def read_after(self, sequence: int, limit: int) -> list[UserChange]:
        """Up to ``limit`` changes numbered above ``sequence``, in order; if there is none at
        sequence + 1 but there are later ones (the changes after ``sequence`` are gone, or one is
        not visible yet), the lowest change above ``sequence`` alone: the caller tells which.

        A caller that is up to date (the usual poll) costs one lookup by ``_id``, which FerretDB
        too serves from an index; only catching up reads a range (which FerretDB answers by a scan).
        """
        if await self._changes.find_one({"_id": sequence + 1}, projection={"_id": 1}) is None:
            if await self._last_sequence() <= sequence:
                return []
            lowest = await self._changes.find_one({"_id": {"$gt": sequence}}, sort=[("_id", ASCENDING)])
            return [] if lowest is None else [_change_from_document(lowest)]
        cursor = self._changes.find({"_id": {"$gt": sequence, "$lte": sequence + limit}}).sort("_id", ASCENDING)
        return [_change_from_document(document) async for document in cursor]

    async def _last_sequence(self) -> int:
        # The head names a stored change, and is at most a few behind (a publisher died between
        # its insert and moving the head): walk on from it.
        last = await self._head()
        while await self._changes.find_one({"_id": last + 1}, projection={"_id": 1}) is not None:
            last += 1
        return last

    async def _head(self) -> int:
        head = await self._heads.find_one({"_id": _HEAD})
        if head is not None:
            return int(head["last"])
        # No head yet (the first change, or changes stored before heads existed): the maximum, read once.
        newest = await self._changes.find_one({}, projection={"_id": 1}, sort=[("_id", DESCENDING)])
        return 0 if newest is None else int(newest["_id"])

    async def _publish(self, user_id: Any) -> None:
        document = await self._users.find_one({"_id": user_id}, projection=_PUBLISHED_FIELDS)
        if document is None:
            return
        entries: list[Document] = document.get("pending_changes") or []
        if entries:
            first_number = int(document.get("change_number", len(entries))) - len(entries) + 1
            snapshot = _user_snapshot(document)
            for offset, entry in enumerate(entries):
                deleted = entry["type"] == ChangeType.DELETED.value
                await self._append(
                    {
                        "user_id": str(user_id),
                        "number": first_number + offset,
                        "type": entry["type"],
                        "changed_at": entry["at"],
                        "published_at": datetime.now(UTC),
                        **({} if deleted else {"user": snapshot}),
                    }
                )
            # Whole elements, as written: FerretDB's $pull takes no conditions.
            await self._users.update_one({"_id": user_id}, {"$pullAll": {"pending_changes": entries}})
            await self._users.update_one(
                {"_id": user_id, "pending_changes": {"$size": 0}},
                {"$unset": {"pending_changes": "", "pending_changes_since": ""}},
            )
            if self.on_published is not None:
                self.on_published()
        if document.get("deleting") is not None:
            await self._finish_deletion(user_id)

    async def _append(self, change: Document) -> None:
        """Insert ``change`` at the next free number, which is always (the highest stored) + 1.

        Starts from the head (a stored number) and moves up one on each number found taken: so
        when an insert at n succeeds, every number below n was found stored.
        """
        number = await self._head() + 1
        for _ in range(_APPEND_ROUNDS):
            change["_id"] = number
            try:
                await self._changes.insert_one(change)
            except DuplicateKeyError:
                # Which unique index refused it? FerretDB does not say, so look, by _id only.
                holder = await self._changes.find_one({"_id": number}, projection={"user_id": 1, "number": 1})
                if holder is None or (holder["user_id"], holder["number"]) == (change["user_id"], change["number"]):
                    return  # published already (the user's number is taken), by another publisher or earlier
                number = max(number + 1, await self._head() + 1)  # the number is another change's
                continue
            await self._move_head(number)
            return
        raise StorageUnavailable("too many publishers at once; the change stays pending")

    async def _move_head(self, number: int) -> None:
        try:
            await self._heads.update_one(
                {"_id": _HEAD, "last": {"$lt": number}}, {"$set": {"last": number}}, upsert=True
            )
        except OperationFailure as error:
            # The head is at or past the number already (the upsert's insert clashed): nothing to do.
            if not _is_duplicate_key(error):
                raise

    async def _finish_deletion(self, user_id: Any) -> None:
        """Once a deleted user's changes are all published: move its pending notices to the outbox,
        then delete the document (no new notice can arrive: every update skips marked documents)."""
        document = await self._users.find_one(
            {"_id": user_id, "deleting": {"$ne": None}},
            projection={"pending_mail": 1, "pending_changes": 1, "username_key": 1, "email_key": 1},
        )
        if document is None or document.get("pending_changes"):
            return
        if self._outbox is not None:
            for notice in document.get("pending_mail") or ():
                moved = _notice_from_document(notice)
                await self._outbox.enqueue(moved.mail, datetime.now(UTC), mail_id=moved.id, notice_of=str(user_id))
        deleted = await self._users.delete_one(
            {
                "_id": user_id,
                "deleting": {"$ne": None},
                "$or": [{"pending_changes": None}, {"pending_changes": {"$size": 0}}],
            }
        )
        if deleted.deleted_count:
            # Its names are free now. If the process dies first, the claims name a user that is
            # gone, and the next claimant takes them over (MongoClaims.claim).
            await self._claims.release_all_of(document)


# Publishers retry this often when other publishers take the number they computed.
_APPEND_ROUNDS = 50
_HEAD = "user_changes"
_SWEEP_LIMIT = 100
# What a publisher reads of a user: the User the change shows, never a secret.
_PUBLISHED_FIELDS = {
    name: 1
    for name in (
        "username",
        "first_name",
        "last_name",
        "email",
        "gender",
        "role",
        "is_active",
        "state",
        "created_at",
        "updated_at",
        "revision",
        "mfa.state",
        "change_number",
        "pending_changes",
        "deleting",
    )
}


def _user_snapshot(document: Document) -> Document:
    snapshot: Document = {
        name: document[name]
        for name in (
            "_id",
            "username",
            "first_name",
            "last_name",
            "email",
            "gender",
            "role",
            "is_active",
            "state",
            "created_at",
            "updated_at",
            "revision",
        )
        if name in document
    }
    if (document.get("mfa") or {}).get("state") is not None:
        snapshot["mfa"] = {"state": document["mfa"]["state"]}
    return snapshot


def _change_from_document(document: Document) -> UserChange:
    user = document.get("user")
    return UserChange(
        sequence=int(document["_id"]),
        user_id=document["user_id"],
        number=int(document["number"]),
        type=ChangeType(document["type"]),
        changed_at=document["changed_at"],
        user=None if user is None else _user_from_document(user),
    )


class MongoSessionRepository:
    """The ``sessions`` collection: one document per session, holding its refresh-token generation and
    the keyed digest of its current token, found by ``_id`` (which the token names)."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._sessions: AsyncCollection[Document] = database["sessions"]

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._sessions.create_index([("user_id", ASCENDING)], name="user_id")
        # Serve housekeeping's purge of ended sessions.
        await self._sessions.create_index([("expires_at", ASCENDING)], name="expires_at")
        await self._sessions.create_index([("revoked_at", ASCENDING)], name="revoked_at")
        # Sessions found refresh tokens by digest, and kept every used one, before tokens named their session.
        existing = {index["name"] async for index in await self._sessions.list_indexes()}
        for obsolete in ("token_digest_unique", "used_digests"):
            if obsolete in existing:
                try:
                    await self._sessions.drop_index(obsolete)
                except OperationFailure as error:
                    if error.code != _INDEX_NOT_FOUND:  # else another replica, starting too, dropped it first
                        raise

    def new_id(self) -> str:
        return str(ObjectId())

    @_storage_errors
    async def create(
        self,
        session_id: str,
        user_id: str,
        token_digest: str,
        now: datetime,
        expires_at: datetime,
        token_version: int,
    ) -> Session:
        document: Document = {
            "_id": _object_id(session_id),
            "user_id": user_id,
            "token_version": token_version,
            "generation": 0,
            "token_digest": token_digest,
            "created_at": now,
            "last_used_at": now,
            "expires_at": expires_at,
            "revoked_at": None,
        }
        await self._sessions.insert_one(document)
        return _session_from_document(document)

    @_storage_errors
    async def rotate(
        self, session_id: str, generation: int, token_digest: str, new_token_digest: str, now: datetime
    ) -> Session | None:
        document = await self._sessions.find_one_and_update(
            {
                "_id": _object_id(session_id),
                "generation": generation,
                "token_digest": token_digest,
                "revoked_at": None,
                "expires_at": {"$gt": now},
            },
            {"$set": {"token_digest": new_token_digest, "last_used_at": now}, "$inc": {"generation": 1}},
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else _session_from_document(document)

    @_storage_errors
    async def revoke_replayed(self, session_id: str, generation: int, now: datetime) -> Session | None:
        document = await self._sessions.find_one_and_update(
            {"_id": _object_id(session_id), "generation": {"$gt": generation}, "revoked_at": None},
            {"$set": {"revoked_at": now}},
        )
        return None if document is None else _session_from_document(document)

    @_storage_errors
    async def revoke(self, session_id: str, now: datetime) -> None:
        await self._sessions.update_one(
            {"_id": _object_id(session_id), "revoked_at": None}, {"$set": {"revoked_at": now}}
        )

    @_storage_errors
    async def list_active(self, user_id: str, now: datetime) -> list[Session]:
        cursor = self._sessions.find(
            # Sessions from before refresh tokens named their session have no generation: their tokens
            # are refused, so they are not listed as active.
            {"user_id": user_id, "revoked_at": None, "expires_at": {"$gt": now}, "generation": {"$exists": True}}
        )
        documents = await cursor.sort("created_at", -1).to_list()
        return [_session_from_document(document) for document in documents]

    @_storage_errors
    async def revoke_all(self, user_id: str, now: datetime) -> None:
        await self._sessions.update_many({"user_id": user_id, "revoked_at": None}, {"$set": {"revoked_at": now}})


class MongoThrottleStore:
    """The ``throttles`` collection: one small document per tally, found by ``_id``.

    Failure tallies change only by conditional updates: below its limit a tally counts every try
    at once; at the limit only by compare-and-set on its count and time, so two tries racing
    there never both count as the one a delay lets through.
    """

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._tallies: AsyncCollection[Document] = database["throttles"]

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._tallies.create_index([("account", ASCENDING)], name="account")
        # Served to housekeeping, which deletes tallies past their use (FerretDB has no TTL indexes).
        await self._tallies.create_index([("expires_at", ASCENDING)], name="expires_at")

    @_storage_errors
    async def get(self, keys: list[str]) -> dict[str, Tally]:
        documents = await self._tallies.find({"_id": {"$in": keys}}).to_list()
        return {document["_id"]: _tally_from_document(document) for document in documents}

    @_storage_errors
    async def count_failure(
        self,
        key: str,
        account: str,
        *,
        seen: Tally | None,
        below: int,
        now: datetime,
        window: timedelta,
        settles_by: datetime,
        expires_at: datetime,
    ) -> bool:
        # BSON dates hold milliseconds: the time stored must equal the one read back, for compare-and-set.
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        fresh = {
            "account": account,
            "kind": "password",
            "count": 1,
            "pending": 1,
            "last_at": now,
            "settles_by": settles_by,
            "expires_at": expires_at,
        }
        if seen is None:
            try:
                await self._tallies.insert_one({"_id": key, **fresh})
            except DuplicateKeyError:
                return False
            return True
        as_seen = {"count": seen.count, "last_at": seen.last_at}
        if seen.last_at <= now - window:
            result = await self._tallies.update_one({"_id": key, **as_seen}, {"$set": fresh})
            return result.modified_count == 1
        # Below the limit any number of tries count at once, whatever the others did meanwhile: only
        # at the limit must the tally still be as seen (the one try a delay lets through).
        result = await self._tallies.update_one(
            {"_id": key, "last_at": {"$gt": now - window}, "$or": [{"count": {"$lt": below}}, as_seen]},
            {
                "$inc": {"count": 1, "pending": 1},
                "$max": {"last_at": now, "settles_by": settles_by, "expires_at": expires_at},
            },
        )
        return result.modified_count == 1

    @_storage_errors
    async def settle_failure(self, key: str, now: datetime) -> None:
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as count_failure stores it
        await self._tallies.update_one(
            {"_id": key, "pending": {"$gt": 0}}, {"$inc": {"pending": -1}, "$max": {"last_at": now}}
        )

    @_storage_errors
    async def uncount_failure(self, key: str) -> None:
        await self._tallies.update_one(
            {"_id": key, "count": {"$gt": 0}, "pending": {"$gt": 0}}, {"$inc": {"count": -1, "pending": -1}}
        )

    @_storage_errors
    async def forget(self, key: str) -> None:
        await self._tallies.delete_one({"_id": key})

    @_storage_errors
    async def remember(self, key: str, account: str, now: datetime, expires_at: datetime) -> None:
        await self._tallies.update_one(
            {"_id": key},
            {
                "$set": {"account": account, "kind": "known", "last_at": now, "expires_at": expires_at},
                "$inc": {"count": 1},
            },
            upsert=True,
        )

    @_storage_errors
    async def forget_account(self, account: str) -> None:
        await self._tallies.delete_many({"account": account, "kind": "password"})

    @_storage_errors
    async def hit(self, key: str, expires_at: datetime) -> int:
        for _ in range(2):
            try:
                document = await self._tallies.find_one_and_update(
                    {"_id": key},
                    {"$inc": {"count": 1}, "$setOnInsert": {"kind": "rate", "expires_at": expires_at}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                continue  # MongoDB: two first hits raced to insert; the loser increments the winner's
            assert document is not None
            return int(document["count"])
        raise StorageUnavailable()


def _tally_from_document(document: Document) -> Tally:
    return Tally(
        count=document["count"],
        last_at=document["last_at"],
        pending=document.get("pending", 0),
        settles_by=document.get("settles_by"),
    )


class MongoServiceAccountRepository:
    """The ``service_accounts`` collection: by ``_id`` (the client id), the name unique."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._accounts: AsyncCollection[Document] = database["service_accounts"]

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._accounts.create_index([("name", ASCENDING)], unique=True, name="name_unique")

    def new_id(self) -> str:
        return str(ObjectId())

    @_storage_errors
    async def add(self, account: ServiceAccount, secret_digest: str) -> None:
        try:
            await self._accounts.insert_one(
                {
                    "_id": ObjectId(account.client_id),
                    "name": account.name,
                    "secret_digest": secret_digest,
                    "created_at": account.created_at,
                }
            )
        except DuplicateKeyError:
            raise AlreadyExists("name") from None

    @_storage_errors
    async def secret_digest(self, client_id: str) -> str | None:
        document = await self._accounts.find_one({"_id": _object_id(client_id)}, {"secret_digest": 1})
        return None if document is None else str(document["secret_digest"])

    @_storage_errors
    async def get(self, client_id: str) -> ServiceAccount | None:
        document = await self._accounts.find_one({"_id": _object_id(client_id)}, {"secret_digest": 0})
        return None if document is None else _service_account_from_document(document)

    @_storage_errors
    async def list_after(self, client_id: str | None, limit: int) -> list[ServiceAccount]:
        query: Document = {} if client_id is None else {"_id": {"$gt": _object_id(client_id)}}
        cursor = self._accounts.find(query, {"secret_digest": 0}).sort("_id", ASCENDING).limit(limit)
        return [_service_account_from_document(document) async for document in cursor]

    @_storage_errors
    async def delete(self, client_id: str) -> bool:
        return (await self._accounts.delete_one({"_id": _object_id(client_id)})).deleted_count == 1


def _service_account_from_document(document: Document) -> ServiceAccount:
    return ServiceAccount(client_id=str(document["_id"]), name=document["name"], created_at=document["created_at"])


class MongoAuditTrail:
    """The ``audit_events`` collection: appended to, never updated; purged by housekeeping.

    Indexes (made by :meth:`ensure_indexes`), each ending in the page order (time, _id), newest first:

    - ``time_id``: the unfiltered list, a time range, and housekeeping's purge by age;
    - ``subject_time_id``, ``actor_time_id``, ``type_time_id``: the subject, actor and type filters.
    """

    def __init__(self, database: AsyncDatabase[Document], users: MongoUserRepository) -> None:
        self._events: AsyncCollection[Document] = database["audit_events"]
        self._users = users

    @_storage_errors
    async def ensure_indexes(self) -> None:
        order = [("time", DESCENDING), ("_id", DESCENDING)]
        await self._events.create_index(order, name="time_id")
        await self._events.create_index([("subject_id", ASCENDING), *order], name="subject_time_id")
        await self._events.create_index([("actor.id", ASCENDING), *order], name="actor_time_id")
        await self._events.create_index([("type", ASCENDING), *order], name="type_time_id")

    @_storage_errors
    async def add(self, event: AuditEvent) -> None:
        await self._events.insert_one(
            {
                "time": event.time,
                "type": event.type.value,
                "actor": {"kind": event.actor.kind.value, "id": event.actor.id, "source": event.actor.source},
                "subject_id": event.subject_id,
                "status_code": event.status_code,
                "error_reason": event.error_reason,
                "reason": event.reason,
            }
        )

    @_storage_errors
    async def list_events(self, filters: AuditFilter, before: AuditPosition | None, limit: int) -> list[AuditEvent]:
        clauses = _audit_query(filters)
        if before is not None:
            # The keyset: older than the last event of the page before, by time and then id, so a
            # page deep in the trail costs what the first one does and new events never shift it.
            at = _object_id(before.id)
            clauses.append({"$or": [{"time": {"$lt": before.time}}, {"time": before.time, "_id": {"$lt": at}}]})
        query = {"$and": clauses} if clauses else {}
        cursor = self._events.find(query).sort([("time", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [_audit_event_from_document(document) async for document in cursor]

    @_storage_errors
    async def find_user_id(self, identifier_key: str) -> str | None:
        account = await self._users.find_account(identifier_key)
        return None if account is None else account.user.id


def _audit_query(filters: AuditFilter) -> list[Document]:
    clauses: list[Document] = []
    if filters.subject_id:
        clauses.append({"subject_id": filters.subject_id})
    if filters.actor_id:
        clauses.append({"actor.id": filters.actor_id})
    if filters.types:
        clauses.append({"type": {"$in": sorted(t.value for t in filters.types)}})
    time: Document = {}
    if filters.start_time is not None:
        time["$gte"] = filters.start_time
    if filters.end_time is not None:
        time["$lt"] = filters.end_time
    if time:
        clauses.append({"time": time})
    return clauses


def _audit_event_from_document(document: Document) -> AuditEvent:
    actor = document["actor"]
    return AuditEvent(
        id=str(document["_id"]),
        type=AuditEventType(document["type"]),
        time=document["time"],
        actor=AuditActor(kind=ActorKind(actor["kind"]), id=actor["id"], source=actor["source"]),
        subject_id=document["subject_id"],
        status_code=int(document["status_code"]),
        error_reason=document["error_reason"],
        reason=document["reason"],
    )


class MongoKeyStore:
    """The ``signing_keys`` collection; private keys arrive and leave sealed."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._keys: AsyncCollection[Document] = database["signing_keys"]

    @_storage_errors
    async def add(self, key: StoredKey) -> None:
        await self._keys.insert_one(
            {
                "_id": key.kid,
                "sealed_private_key": key.sealed_private_key,
                "created_at": key.created_at,
                "retired_at": key.retired_at,
            }
        )

    @_storage_errors
    async def all(self) -> list[StoredKey]:
        documents = await self._keys.find({}).to_list()
        return [
            StoredKey(
                kid=document["_id"],
                sealed_private_key=bytes(document["sealed_private_key"]),
                created_at=document["created_at"],
                retired_at=document.get("retired_at"),
            )
            for document in documents
        ]

    @_storage_errors
    async def retire(self, kid: str, now: datetime) -> bool:
        result = await self._keys.update_one({"_id": kid, "retired_at": None}, {"$set": {"retired_at": now}})
        return result.modified_count == 1

    @_storage_errors
    async def reseal(self, kid: str, sealed: bytes, resealed: bytes) -> bool:
        """Replace the sealed private key, unless it changed since it was read as ``sealed``."""
        result = await self._keys.update_one(
            {"_id": kid, "sealed_private_key": sealed}, {"$set": {"sealed_private_key": resealed}}
        )
        return result.modified_count == 1


class MongoKeyMaterial:
    """The ``key_material`` collection: named secrets of the service itself (the digest root),
    sealed under the key-encryption key, by ``_id``."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._material: AsyncCollection[Document] = database["key_material"]

    @_storage_errors
    async def get(self, name: str) -> bytes | None:
        document = await self._material.find_one({"_id": name})
        return None if document is None else bytes(document["sealed"])

    @_storage_errors
    async def add(self, name: str, sealed: bytes) -> bool:
        """Store it unless one of that name exists (another replica was first): then False."""
        try:
            await self._material.insert_one({"_id": name, "sealed": sealed})
        except DuplicateKeyError:
            return False
        return True

    @_storage_errors
    async def reseal(self, name: str, sealed: bytes, resealed: bytes) -> bool:
        """Replace it, unless it changed since it was read as ``sealed``."""
        result = await self._material.update_one({"_id": name, "sealed": sealed}, {"$set": {"sealed": resealed}})
        return result.modified_count == 1

    @_storage_errors
    async def named_with_prefix(self, prefix: str) -> list[tuple[str, bytes, datetime | None]]:
        """Name, sealed value and ``in_use_from`` (None if it has none) of each secret whose name
        starts with ``prefix``; an anchored prefix of ``_id``, so served by its index."""
        cursor = self._material.find({"_id": {"$regex": f"^{re.escape(prefix)}"}})
        return [
            (str(document["_id"]), bytes(document["sealed"]), self._aware_or_none(document.get("in_use_from")))
            async for document in cursor
        ]

    @staticmethod
    def _aware_or_none(value: datetime | None) -> datetime | None:
        # BSON dates are UTC; a client without tz_aware reads them naive.
        return None if value is None else value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    @_storage_errors
    async def add_in_use_from(self, name: str, sealed: bytes, in_use_from: datetime) -> bool:
        """Store it, to be used from ``in_use_from``, unless one of that name exists: then False."""
        try:
            await self._material.insert_one({"_id": name, "sealed": sealed, "in_use_from": in_use_from})
        except DuplicateKeyError:
            return False
        return True


class MongoOutbox:
    """The ``outbox`` collection: mail waits here until a sender, in any replica, delivers it.

    Bodies (which may hold a code or a reset token) are stored sealed with AES-GCM under a key
    derived from the key-encryption key, the mail's id, recipient and subject bound in as
    associated data: a copy of the database reads no body, and a body moved to another mail
    does not open. Senders get the opened body; the services never see the difference.
    """

    def __init__(self, database: AsyncDatabase[Document], secrets: SecretsAtRest) -> None:
        self._outbox: AsyncCollection[Document] = database["outbox"]
        self._users: AsyncCollection[Document] = database["users"]  # only for mail queued before notice_of
        self._secrets = secrets

    @_storage_errors
    async def ensure_indexes(self) -> None:
        await self._outbox.create_index(
            [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="status_next_attempt_at"
        )
        # Serves housekeeping's purge of failed mail.
        await self._outbox.create_index([("status", ASCENDING), ("failed_at", ASCENDING)], name="status_failed_at")

    @_storage_errors
    async def seal_legacy_mail(self) -> int:
        """Seal the bodies of mail queued before bodies were sealed, and date those given up before
        failures were dated (by the end of their last attempt), so housekeeping drops them too.

        Run at start; the outbox is small (mail leaves it on delivery). How many it sealed.
        """
        sealed = 0
        async for document in self._outbox.find({"body": {"$exists": True}}):
            fields: Document = {
                "sealed_body": self._secrets.seal_mail_body(
                    document["body"], _mail_associated_data(document["_id"], document["to"], document["subject"])
                )
            }
            if document.get("status") == "failed" and document.get("failed_at") is None:
                fields["failed_at"] = document["next_attempt_at"]
            result = await self._outbox.update_one(
                {"_id": document["_id"], "body": {"$exists": True}}, {"$set": fields, "$unset": {"body": ""}}
            )
            sealed += result.modified_count
        return sealed

    @_storage_errors
    async def enqueue(
        self, mail: Mail, now: datetime, *, mail_id: str | None = None, notice_of: str | None = None
    ) -> None:
        """Queue ``mail``; with a ``mail_id`` (a notice's), queueing it again while queued does nothing."""
        object_id = ObjectId() if mail_id is None else ObjectId(mail_id)
        try:
            await self._outbox.insert_one(
                {
                    "_id": object_id,
                    "to": mail.to,
                    "subject": mail.subject,
                    "sealed_body": self._secrets.seal_mail_body(
                        mail.body, _mail_associated_data(object_id, mail.to, mail.subject)
                    ),
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "notice_of": None if notice_of is None else ObjectId(notice_of),
                }
            )
        except DuplicateKeyError:
            if mail_id is None:
                raise

    @_storage_errors
    async def claim(self, now: datetime, lease_seconds: float) -> QueuedMail | None:
        while True:
            document = await self._outbox.find_one_and_update(
                # "sending" past its lease: a sender died mid-delivery, so the mail may go out twice, never zero times.
                {"status": {"$in": ["pending", "sending"]}, "next_attempt_at": {"$lte": now}},
                {
                    "$set": {"status": "sending", "next_attempt_at": now + timedelta(seconds=lease_seconds)},
                    "$inc": {"attempts": 1},
                },
                sort=[("next_attempt_at", ASCENDING)],
                return_document=ReturnDocument.AFTER,
            )
            if document is None:
                return None
            mail = self._opened(document)
            if mail is not None:
                return QueuedMail(
                    id=str(document["_id"]),
                    mail=mail,
                    attempts=document["attempts"],
                    notice_of=await self._notice_owner(document),
                )
            # Tampered with, or sealed under another key-encryption key: it can never go out.
            await self.give_up(str(document["_id"]), "the sealed body does not open", now)

    async def _notice_owner(self, document: Document) -> str | None:
        if "notice_of" in document:
            return None if document["notice_of"] is None else str(document["notice_of"])
        # Queued by a version that did not record it: the user whose document still holds the
        # notice, if any (the pending_mail_id index serves this on MongoDB).
        owner = await self._users.find_one({"pending_mail.id": document["_id"]}, projection={"_id": 1})
        return None if owner is None else str(owner["_id"])

    @_storage_errors
    async def reseal_bodies(self) -> tuple[int, int, int]:
        """Seal every body under the current key-encryption key, each by a compare-and-set on its
        sealed value (a body changed meanwhile is read again). The outbox is small: mail leaves it
        on delivery. Returns how many were re-sealed, already current, and opened by no key."""
        resealed = current = unopenable = 0
        async for document in self._outbox.find(
            {"sealed_body": {"$exists": True}}, {"sealed_body": 1, "to": 1, "subject": 1}
        ):
            associated_data = _mail_associated_data(document["_id"], document["to"], document["subject"])
            sealed = bytes(document["sealed_body"])
            while True:
                try:
                    new = self._secrets.reseal_mail_body(sealed, associated_data)
                except InvalidTag:
                    unopenable += 1
                    break
                if new is None:
                    current += 1
                    break
                result = await self._outbox.update_one(
                    {"_id": document["_id"], "sealed_body": sealed}, {"$set": {"sealed_body": new}}
                )
                if result.modified_count == 1:
                    resealed += 1
                    break
                again = await self._outbox.find_one({"_id": document["_id"]}, {"sealed_body": 1})
                if again is None:  # delivered meanwhile
                    break
                sealed = bytes(again["sealed_body"])
        return resealed, current, unopenable

    def _opened(self, document: Document) -> Mail | None:
        to, subject = document["to"], document["subject"]
        if "body" in document:  # queued before bodies were sealed
            return Mail(to=to, subject=subject, body=document["body"])
        try:
            body = self._secrets.open_mail_body(
                bytes(document["sealed_body"]), _mail_associated_data(document["_id"], to, subject)
            )
        except (InvalidTag, KeyError, UnicodeDecodeError):
            return None
        return Mail(to=to, subject=subject, body=body)

    @_storage_errors
    async def delivered(self, mail_id: str) -> None:
        # Deleted, not kept: the body may hold a code, which must not outlive its delivery.
        await self._outbox.delete_one({"_id": _object_id(mail_id)})

    @_storage_errors
    async def retry_later(self, mail_id: str, at: datetime, error: str) -> None:
        await self._outbox.update_one(
            {"_id": _object_id(mail_id)},
            {"$set": {"status": "pending", "next_attempt_at": at, "last_error": error}},
        )

    @_storage_errors
    async def postpone(self, mail_id: str, at: datetime) -> None:
        await self._outbox.update_one(
            {"_id": _object_id(mail_id)},
            # The claim counted an attempt that was never made.
            {"$set": {"status": "pending", "next_attempt_at": at}, "$inc": {"attempts": -1}},
        )

    @_storage_errors
    async def give_up(self, mail_id: str, error: str, now: datetime) -> None:
        await self._outbox.update_one(
            {"_id": _object_id(mail_id)},
            {"$set": {"status": "failed", "failed_at": now, "last_error": error}},
        )

    @_storage_errors
    async def counts(self) -> tuple[int, int, datetime | None]:
        """Mail waiting, mail given up, and when the oldest waiting mail was queued (for metrics).

        Each query selects on ``status``, the first field of an index; delivered mail is deleted,
        so only the waiting mail is read to find the oldest.
        """
        waiting = {"status": {"$in": ["pending", "sending"]}}
        pending = await self._outbox.count_documents(waiting)
        failed = await self._outbox.count_documents({"status": "failed"})
        oldest = await self._outbox.find_one(waiting, {"created_at": 1}, sort=[("created_at", ASCENDING)])
        return pending, failed, None if oldest is None else oldest.get("created_at")


def _mail_associated_data(mail_id: ObjectId, to: str, subject: str) -> bytes:
    """What a sealed body belongs to: its mail's id, recipient and subject, unambiguously encoded."""
    return bson.encode({"purpose": "outbox-mail", "id": mail_id, "to": to, "subject": subject})


class MongoHousekeeping:
    """Leases for jobs that one replica at a time runs (the ``leases`` collection, by ``_id``), and
    the purges of housekeeping, each served by an index."""

    def __init__(self, database: AsyncDatabase[Document], outbox: MongoOutbox | None = None) -> None:
        self._leases: AsyncCollection[Document] = database["leases"]
        self._users: AsyncCollection[Document] = database["users"]
        self._sessions: AsyncCollection[Document] = database["sessions"]
        self._outbox: AsyncCollection[Document] = database["outbox"]
        self._throttles: AsyncCollection[Document] = database["throttles"]
        self._claims = MongoClaims(database)
        self._audit_events: AsyncCollection[Document] = database["audit_events"]
        self._changes: AsyncCollection[Document] = database["user_changes"]
        self._change_log = MongoChangeLog(database, outbox)

    @_storage_errors
    async def take_lease(self, job: str, holder: str, now: datetime, lease_seconds: float) -> bool:
        try:
            document = await self._leases.find_one_and_update(
                # Free (its lease ran out) or already ours; if there is no lease document yet, the upsert makes it.
                {"_id": job, "$or": [{"leased_until": {"$lt": now}}, {"holder": holder}]},
                {"$set": {"leased_until": now + timedelta(seconds=lease_seconds), "holder": holder, "taken_at": now}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            # The document exists and another holder's lease is running: the upsert's insert clashed.
            return False
        return document is not None and document["holder"] == holder

    @_storage_errors
    async def purge_ended_sessions(self, ended_before: datetime) -> int:
        deleted = 0
        for query in ended_sessions_queries(ended_before):
            deleted += (await self._sessions.delete_many(query)).deleted_count
        return deleted

    @_storage_errors
    async def purge_never_activated_users(self, created_before: datetime) -> int:
        # Deleted as any user is (MongoUserRepository._delete_where): marked with the change, then finished.
        now = datetime.now(UTC)
        marked = await self._users.update_many(
            {**never_activated_query(created_before), **_LIVE},
            _with_change({"$set": {"deleting": now}}, ChangeType.DELETED, now),
        )
        # Finished at once, so the usernames and emails are free when the purge returns.
        for _ in range(marked.modified_count // _SWEEP_LIMIT + 1):
            if await self._change_log.sweep(now, _SWEEP_LIMIT) < _SWEEP_LIMIT:
                break
        return marked.modified_count

    @_storage_errors
    async def release_stale_claims(self, now: datetime) -> int:
        return await self._claims.release_stale(now)

    @_storage_errors
    async def purge_changes(self, published_before: datetime) -> int:
        """Delete the changes published before ``published_before``: always a prefix of the
        sequence (so the retained changes stay consecutive), and never the newest change (so
        the sequence never starts over)."""
        boundary = await self._changes.find_one(
            {"published_at": {"$lt": published_before}}, projection={"_id": 1}, sort=[("published_at", DESCENDING)]
        )
        if boundary is None:
            return 0
        last = min(int(boundary["_id"]), await self._change_log.last_sequence() - 1)
        return (await self._changes.delete_many({"_id": {"$lte": last}})).deleted_count

    @_storage_errors
    async def purge_failed_mail(self, failed_before: datetime) -> int:
        return (await self._outbox.delete_many(failed_mail_query(failed_before))).deleted_count

    @_storage_errors
    async def purge_expired_tallies(self, now: datetime) -> int:
        return (await self._throttles.delete_many(expired_tallies_query(now))).deleted_count

    @_storage_errors
    async def purge_audit_events(self, recorded_before: datetime) -> int:
        # FerretDB has no TTL indexes, so age is purged here, on the time_id index.
        return (await self._audit_events.delete_many(audit_events_query(recorded_before))).deleted_count


# The purges' queries, each served by an index that ensure_indexes makes (tests check the plans).


def ended_sessions_queries(ended_before: datetime) -> list[Document]:
    """Sessions that expired, and sessions that were revoked, before ``ended_before``."""
    return [{"expires_at": {"$lt": ended_before}}, {"revoked_at": {"$lt": ended_before}}]


def never_activated_query(created_before: datetime) -> Document:
    # A pending activation marks an account never activated (activating removes it); an account
    # deactivated later has none, and is kept.
    # Imported users were accounts elsewhere: waiting does not make them abandoned.
    return {
        "is_active": False,
        "created_at": {"$lt": created_before},
        "activation": {"$type": "object"},
        "imported": {"$ne": True},
    }


def failed_mail_query(failed_before: datetime) -> Document:
    return {"status": "failed", "failed_at": {"$lt": failed_before}}


def expired_tallies_query(now: datetime) -> Document:
    # Throttle tallies past any use: failures past their window and longest delay, request
    # counts of a past window, sources not seen within their lifetime.
    return {"expires_at": {"$lt": now}}


def audit_events_query(recorded_before: datetime) -> Document:
    return {"time": {"$lt": recorded_before}}


def _is_duplicate_key(error: OperationFailure) -> bool:
    """A unique index refused the write. MongoDB says so with E11000 (DuplicateKeyError); FerretDB
    on SQLite says so for updates (not inserts) only as an InternalError naming the constraint."""
    return isinstance(error, DuplicateKeyError) or (error.code == 1 and "UNIQUE constraint failed" in str(error))


def _object_id(value: str) -> ObjectId | str:
    """The ``_id`` that ``value`` names. Every ``_id`` here is an ObjectId, so a string that
    is not one (from a forged token, say) stays a string and names no document: not found,
    rather than a bson error."""
    return ObjectId(value) if ObjectId.is_valid(value) else value


# What each state looks like in a filter. Documents written before states existed have no
# ``state``: they were active (is_active true) or never activated.
_STATE_FILTERS: dict[UserState, Document] = {
    UserState.ACTIVE: {"is_active": True},
    UserState.PENDING_ACTIVATION: {
        "is_active": False,
        "state": {"$nin": [UserState.DEACTIVATED.value, UserState.LOCKED.value]},
    },
    UserState.DEACTIVATED: {"state": UserState.DEACTIVATED.value},
    UserState.LOCKED: {"state": UserState.LOCKED.value},
}
_NEVER_ACTIVATED = _STATE_FILTERS[UserState.PENDING_ACTIVATION]


def _state_of(document: Document) -> UserState:
    state = document.get("state")
    if state is not None:
        return UserState(state)
    # Written before states existed: only activation set is_active, and nothing cleared it.
    return UserState.ACTIVE if document["is_active"] else UserState.PENDING_ACTIVATION


def _new_password(password_hash: str, now: datetime) -> Document:
    """The update that sets a new password: every token so far ends (the version), a hash of our
    scheme replaces an imported one, and a reset token or an email change pending from before
    dies with the old password."""
    return {
        "$set": {"password_hash": password_hash, "updated_at": now},
        "$unset": {"password_reset": "", "password_scheme": "", "email_change": ""},
        "$inc": {"token_version": 1},
    }


def _unclaimed(now: datetime) -> Document:
    """The filter for a user document whose notices no sender holds (a claim past its lease counts as none)."""
    return {"$or": [{"pending_mail_claim.until": {"$lte": now}}, {"pending_mail_claim": None}]}


def _live_claim(document: Document, now: datetime) -> datetime | None:
    until: datetime | None = (document.get("pending_mail_claim") or {}).get("until")
    return until if until is not None and until > now else None


def _mfa_removed(notice: Mail, now: datetime) -> Document:
    """Remove the user's authenticator and recovery codes: their tokens die, they are told, and
    the change feed shows mfa_enabled off (DisableMfa and an admin's ResetUserMfa alike)."""
    update = {"$unset": {"mfa": ""}, "$set": {"updated_at": now}, "$inc": {"token_version": 1}}
    return _with_change(_with_notice(update, notice, now), ChangeType.UPDATED, now)


def _with_notice(update: Document, notice: Mail, now: datetime) -> Document:
    """``update`` that also pends ``notice`` in the user's document (see the module docstring)."""
    return {
        **update,
        "$push": {"pending_mail": _notice_document(Notice(id=str(ObjectId()), mail=notice))},
        # The oldest waiting notice's time; a later push leaves it.
        "$min": {"pending_mail_since": now},
    }


# A user document marked deleting is gone for every call: only the change log still reads it,
# to publish its changes and finish the deletion.
_LIVE: Document = {"deleting": None}


def _with_change(update: Document, change: ChangeType, now: datetime) -> Document:
    """``update`` that also pends ``change`` for the change feed in the user's document.

    The entry carries no number: the update counts ``change_number`` up, and the entries
    pending are always the last ones counted (they leave the array only from its front, once
    published), so the publisher reads each entry's number off the document (MongoChangeLog).
    """
    return {
        **update,
        "$inc": {**update.get("$inc", {}), "change_number": 1},
        "$push": {**update.get("$push", {}), "pending_changes": _change_entry(change, now)},
        "$min": {**update.get("$min", {}), "pending_changes_since": now},
    }


def _change_entry(change: ChangeType, now: datetime) -> Document:
    # The id makes each entry distinct, so that publishers can $pullAll exactly the entries they published.
    return {"id": ObjectId(), "type": change.value, "at": now}


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


def _notice_document(notice: Notice) -> Document:
    return {"id": ObjectId(notice.id), "to": notice.mail.to, "subject": notice.mail.subject, "body": notice.mail.body}


def _notice_from_document(document: Document) -> Notice:
    return Notice(
        id=str(document["id"]), mail=Mail(to=document["to"], subject=document["subject"], body=document["body"])
    )


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
        # Absent for our own scheme, as in every document stored before imports existed.
        **(
            {}
            if new_user.password_scheme is PasswordScheme.PEPPERED
            else {"password_scheme": new_user.password_scheme.value}
        ),
        **({"imported": True} if new_user.imported else {}),
    }


def _activation_document(code: ActivationCode) -> Document:
    return {
        "digest": code.digest,
        "expires_at": code.expires_at,
        "attempts_left": code.attempts_left,
        "sends_in_window": code.sends_in_window,
        "window_started_at": code.window_started_at,
        "token_digest": code.token_digest,
        "token_expires_at": code.token_expires_at,
    }


def _user_from_document(document: Document) -> User:
    return User(
        id=str(document["_id"]),
        username=document["username"],
        first_name=document["first_name"],
        last_name=document["last_name"],
        email=document["email"],
        gender=Gender(document["gender"]),
        role=Role(document["role"]),
        state=_state_of(document),
        created_at=document["created_at"],
        updated_at=document["updated_at"],
        token_version=document.get("token_version", 0),
        mfa_enabled=(document.get("mfa") or {}).get("state") == "active",
        revision=document.get("revision", 0),
    )


def _session_from_document(document: Document) -> Session:
    return Session(
        id=str(document["_id"]),
        user_id=document["user_id"],
        created_at=document["created_at"],
        last_used_at=document["last_used_at"],
        expires_at=document["expires_at"],
        token_version=document.get("token_version", 0),
    )


def _account_from_document(document: Document) -> Account:
    activation = document.get("activation")
    password_reset = document.get("password_reset")
    mfa = document.get("mfa")
    return Account(
        user=_user_from_document(document),
        password_hash=document["password_hash"],
        password_scheme=PasswordScheme(document.get("password_scheme", PasswordScheme.PEPPERED.value)),
        activation=None if activation is None else _activation_from_document(activation),
        password_reset=None if password_reset is None else _activation_from_document(password_reset),
        mfa=None
        if mfa is None
        else Mfa(
            active=mfa["state"] == "active",
            sealed_secret=bytes(mfa["sealed_secret"]),
            last_used_step=mfa["last_used_step"],
            recovery_digests=tuple(mfa["recovery_digests"]),
        ),
    )


def _activation_from_document(activation: Document) -> ActivationCode:
    return ActivationCode(
        digest=activation["digest"],
        expires_at=activation["expires_at"],
        attempts_left=activation["attempts_left"],
        sends_in_window=activation["sends_in_window"],
        window_started_at=activation["window_started_at"],
        token_digest=activation.get("token_digest", ""),
        token_expires_at=activation.get("token_expires_at"),
    )


async def ping(database: AsyncDatabase[Document], timeout_seconds: float) -> bool:
    """True if the database answers a ping within ``timeout_seconds``."""
    try:
        with pymongo.timeout(timeout_seconds):
            await database.command("ping")
    except PyMongoError:
        return False
    return True
