"""MongoDB storage through PyMongo's asyncio client; BSON stays inside this package.

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

from dataclasses import dataclass

from pymongo.asynchronous.database import AsyncDatabase

from users_grpc.adapters.mongo.audit_trail import MongoAuditTrail
from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.claims import MongoClaims
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.groups import MongoGroupRepository
from users_grpc.adapters.mongo.housekeeping import MongoHousekeeping
from users_grpc.adapters.mongo.keys import MongoKeyMaterial, MongoKeyStore
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.mongo.schema import MongoSchema, ensure_indexes
from users_grpc.adapters.mongo.service_accounts import MongoServiceAccountRepository
from users_grpc.adapters.mongo.sessions import MongoSessionRepository
from users_grpc.adapters.mongo.throttles import MongoThrottleStore
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.adapters.secrets_at_rest import SecretsAtRest

__all__ = [
    "MongoAuditTrail",
    "MongoChangeLog",
    "MongoClaims",
    "MongoGroupRepository",
    "MongoHousekeeping",
    "MongoKeyMaterial",
    "MongoKeyStore",
    "MongoOutbox",
    "MongoSchema",
    "MongoServiceAccountRepository",
    "MongoSessionRepository",
    "MongoStores",
    "MongoThrottleStore",
    "MongoUserRepository",
    "build_stores",
]


@dataclass(frozen=True)
class MongoStores:
    """Every store of the service on one database, wired to each other as the server runs them."""

    users: MongoUserRepository
    change_log: MongoChangeLog
    outbox: MongoOutbox
    sessions: MongoSessionRepository
    throttles: MongoThrottleStore
    service_accounts: MongoServiceAccountRepository
    audit_trail: MongoAuditTrail
    keys: MongoKeyStore
    key_material: MongoKeyMaterial
    schema: MongoSchema
    housekeeping: MongoHousekeeping
    groups: MongoGroupRepository

    async def ensure_indexes(self) -> None:
        """The indexes of every schema version (:func:`users_grpc.adapters.mongo.schema.ensure_indexes`)."""
        await ensure_indexes(
            users=self.users,
            outbox=self.outbox,
            sessions=self.sessions,
            throttles=self.throttles,
            service_accounts=self.service_accounts,
            audit_trail=self.audit_trail,
            groups=self.groups,
        )


def build_stores(
    database: AsyncDatabase[Document], secrets_at_rest: SecretsAtRest, *, coalesce_reads: bool = False
) -> MongoStores:
    """The stores on ``database``: users publish their changes through the change log, which moves
    a deleted user's notices to the outbox, whose bodies ``secrets_at_rest`` seals; with
    ``coalesce_reads``, concurrent reads of users by id go out as one find."""
    outbox = MongoOutbox(database, secrets_at_rest)
    change_log = MongoChangeLog(database, outbox)
    users = MongoUserRepository(database, change_log, coalesce_reads=coalesce_reads)
    return MongoStores(
        users=users,
        change_log=change_log,
        outbox=outbox,
        sessions=MongoSessionRepository(database),
        throttles=MongoThrottleStore(database),
        service_accounts=MongoServiceAccountRepository(database),
        audit_trail=MongoAuditTrail(database, users),
        keys=MongoKeyStore(database),
        key_material=MongoKeyMaterial(database),
        schema=MongoSchema(database),
        housekeeping=MongoHousekeeping(database, outbox),
        groups=MongoGroupRepository(database, change_log),
    )
