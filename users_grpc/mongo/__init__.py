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

from users_grpc.mongo.audit_trail import MongoAuditTrail
from users_grpc.mongo.change_log import MongoChangeLog
from users_grpc.mongo.claims import MongoClaims
from users_grpc.mongo.housekeeping import MongoHousekeeping
from users_grpc.mongo.keys import MongoKeyMaterial, MongoKeyStore
from users_grpc.mongo.outbox import MongoOutbox
from users_grpc.mongo.schema import MongoSchema
from users_grpc.mongo.service_accounts import MongoServiceAccountRepository
from users_grpc.mongo.sessions import MongoSessionRepository
from users_grpc.mongo.throttles import MongoThrottleStore
from users_grpc.mongo.users import MongoUserRepository

__all__ = [
    "MongoAuditTrail",
    "MongoChangeLog",
    "MongoClaims",
    "MongoHousekeeping",
    "MongoKeyMaterial",
    "MongoKeyStore",
    "MongoOutbox",
    "MongoSchema",
    "MongoServiceAccountRepository",
    "MongoSessionRepository",
    "MongoThrottleStore",
    "MongoUserRepository",
]
