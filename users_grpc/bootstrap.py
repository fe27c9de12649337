"""The composition root: the only place that builds clients, pools and the server.

:func:`build_app` is three builders in a row: :func:`build_stores` (the MongoDB adapters),
:func:`build_services` (the use cases on them) and :func:`build_server` (the gRPC edge on those).
Tests call :func:`build_app` with port 0 and, where they need to, their own
clock or mail transport; ``users-grpc serve`` calls :func:`serve`.

Over 500 lines, and one file on purpose: this is where every wire between the layers is made,
and a reader who follows one (which store a service gets, which setting becomes which policy)
should not have to change files to see the other end; :class:`App` (start, drain, stop) is the
running form of what the builders make.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The public name is grpc_health.v1.health.aio, which the type stubs do not declare.
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ServerSelectionTimeoutError
from pymongo.monitoring import CommandListener, ConnectionPoolListener

from users.v1 import user_service_pb2, user_service_pb2_grpc
from users_grpc.adapters.bcrypt_hasher import BcryptHasher, common_passwords, yield_to_calls
from users_grpc.adapters.breached_passwords import PwnedPasswordsRange
from users_grpc.adapters.mail_rendering import MailLinks, TemplateMailRenderer
from users_grpc.adapters.mail_transports import DirectoryTransport, SmtpTransport
from users_grpc.adapters.mongo import build_stores as build_mongo_stores
from users_grpc.adapters.mongo.audit_trail import MongoAuditTrail
from users_grpc.adapters.mongo.calls import cancel_abandoned_work, ping
from users_grpc.adapters.mongo.change_log import MongoChangeLog
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.groups import MongoGroupRepository
from users_grpc.adapters.mongo.housekeeping import MongoHousekeeping
from users_grpc.adapters.mongo.keys import MongoKeyMaterial, MongoKeyStore
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.mongo.passkey_ceremonies import MongoCeremonyStore
from users_grpc.adapters.mongo.schema import MongoSchema, ensure_indexes
from users_grpc.adapters.mongo.service_accounts import MongoServiceAccountRepository
from users_grpc.adapters.mongo.sessions import MongoSessionRepository
from users_grpc.adapters.mongo.throttles import MongoThrottleStore
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.adapters.webauthn_relying_party import WebAuthnRelyingParty
from users_grpc.config import Settings
from users_grpc.domain.errors import ConfigError, StorageUnavailable
from users_grpc.domain.model import to_milliseconds
from users_grpc.domain.ports import Clock, MailRenderer, MailTransport
from users_grpc.domain.rules import PasswordPolicy
from users_grpc.grpc_api.access import FLOWS, Authorizer
from users_grpc.grpc_api.audit_interceptor import ADMIN_GRANTED_ON_IMPORT, AUDITED
from users_grpc.grpc_api.health import DatabaseHealth
from users_grpc.grpc_api.interceptors import PipelineInterceptor
from users_grpc.grpc_api.logs import keep_secrets_out_of_logs
from users_grpc.grpc_api.observability import Gauges, Metrics, OutboxState
from users_grpc.grpc_api.reflection import SourceInfoReflectionServicer, load_descriptor_set
from users_grpc.grpc_api.request_ranges import refuse_out_of_range
from users_grpc.grpc_api.servicer import UserServiceServicer
from users_grpc.grpc_api.status import pipeline_code
from users_grpc.grpc_api.tracing import command_listener, tracer_provider_from_env
from users_grpc.http_api.app import ASGIApp, HttpEdge
from users_grpc.http_api.connect import connect_app
from users_grpc.http_api.invoke import Invoker, method_handlers
from users_grpc.http_api.server import HttpLimits, HttpServer
from users_grpc.ops import migrations
from users_grpc.ops.rewrap import load_digest_roots
from users_grpc.pipeline.audit import AuditTrail
from users_grpc.pipeline.chain import Pipeline
from users_grpc.pipeline.guard import CallGuard
from users_grpc.pipeline.observation import Observer
from users_grpc.pipeline.tracing import CallSpans
from users_grpc.scim.app import ScimApp
from users_grpc.services.accounts import AccountPolicy, AccountService
from users_grpc.services.admin import AdminService
from users_grpc.services.audit import AuditLog
from users_grpc.services.changes import ChangeFeed
from users_grpc.services.directory import DirectoryService
from users_grpc.services.email_change import EmailChangePolicy, EmailChangeService
from users_grpc.services.groups import GroupService
from users_grpc.services.housekeeping import HousekeepingJob, Retention
from users_grpc.services.mail import MailDelivery
from users_grpc.services.metadata import MetadataService
from users_grpc.services.mfa import MfaService
from users_grpc.services.passkeys import PasskeyService
from users_grpc.services.password_policy import PasswordLifecycle, PasswordRules
from users_grpc.services.passwords import PasswordService
from users_grpc.services.service_account_tokens import ServiceAccountTokenService
from users_grpc.services.service_accounts import ServiceAccountService
from users_grpc.services.sessions import SessionService
from users_grpc.services.throttling import Flow, PasswordThrottle, RateLimitPolicy, SourceRateLimit, ThrottlePolicy
from users_grpc.services.tokens import AccessTokens, KeyEncryption

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

SERVICE_NAME = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name

# Transport limits (OWASP gRPC cheat sheet; grpc doc/keepalive.md).
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 1024 * 1024),
    ("grpc.http2.min_ping_interval_without_data_ms", 5 * 60 * 1000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_idle_ms", 15 * 60 * 1000),
    # Bounded connection age lets clients rebalance onto new replicas.
    ("grpc.max_connection_age_ms", 30 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 30 * 1000),
    # One process per address: with SO_REUSEPORT a second, stale instance could bind the same
    # port and silently answer half the calls. Workers share theirs (``share_port``), behind the
    # supervisor's reservation of it, which no other server can share (users_grpc/workers.py).
    ("grpc.so_reuseport", 0),
]


class SystemClock:
    def now(self) -> datetime:
        # MongoDB keeps milliseconds: a time cut there before its first write is returned the
        # same by the call that made it (CreateUser's created_at) and by every later read.
        return to_milliseconds(datetime.now(UTC))


@dataclass(frozen=True)
class Stores:
    """The MongoDB side: the client, and a store per collection or aggregate (adapters/mongo)."""

    client: AsyncMongoClient[Document]
    database: AsyncDatabase[Document]
    # Digests of codes and tokens, and sealed mail bodies, under keys derived from the key-encryption key.
    secrets_at_rest: SecretsAtRest
    users: MongoUserRepository
    outbox: MongoOutbox
    change_log: MongoChangeLog
    sessions: MongoSessionRepository
    throttles: MongoThrottleStore
    service_accounts: MongoServiceAccountRepository
    audit_trail: MongoAuditTrail
    schema: MongoSchema
    key_store: MongoKeyStore
    key_material: MongoKeyMaterial
    housekeeping: MongoHousekeeping
    groups: MongoGroupRepository


@dataclass(frozen=True)
class Services:
    """The use cases the servicer calls, and the background work (mail, housekeeping, the change feed)."""

    accounts: AccountService
    passwords: PasswordService
    sessions: SessionService
    mfa: MfaService
    email_changes: EmailChangeService
    admin: AdminService
    service_accounts: ServiceAccountService
    directory: DirectoryService
    audit: AuditLog
    changes: ChangeFeed
    mail: MailDelivery
    housekeeping: HousekeepingJob
    tokens: AccessTokens
    encryption: KeyEncryption
    password_throttle: PasswordThrottle
    passkeys: PasskeyService
    # The hasher's queue is a gauge (USERS_HTTP_ADDRESS); its threads are the App's executor.
    hasher: BcryptHasher
    metadata: MetadataService
    groups: GroupService


@dataclass
class App:
    """A built server and its background work; :meth:`start` it, then :meth:`stop` it."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    stores: Stores
    services: Services
    executor: ThreadPoolExecutor
    health: DatabaseHealth
    health_servicer: AsyncHealthServicer
    # A UserService call through the same pipeline as over gRPC: what the HTTP edge (and SCIM) call.
    invoke: Invoker
    # The HTTP edge (/metrics, the key set, Connect, the mounts), when USERS_HTTP_ADDRESS is set.
    http: HttpServer | None = None
    http_port: int | None = None
    # Set once the database is prepared; until then UserService calls are refused as UNAVAILABLE.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def prepare_database(self) -> None:
        """Create the indexes and the first signing key; wait for the database if it is not up yet."""
        # No RPC is served before the indexes exist and the schema version is known.
        while True:
            try:
                stores = self.stores
                await ensure_indexes(
                    users=stores.users,
                    outbox=stores.outbox,
                    sessions=stores.sessions,
                    throttles=stores.throttles,
                    service_accounts=stores.service_accounts,
                    audit_trail=stores.audit_trail,
                    groups=stores.groups,
                )
                version = await migrations.prepare(stores.schema)
                stores.users.lookups_by_claim = version >= migrations.CLAIMS_COMPLETE
                await stores.outbox.seal_legacy_mail()
                await self.services.tokens.ensure_signing_key()
                # Before any call: the digests of codes and tokens are keyed by it.
                await self.reload_digest_roots()
                return
            except StorageUnavailable as error:
                log.warning(
                    "database not ready; retrying",
                    extra={
                        "database": redacted_uri(self.settings.mongodb_uri),
                        "cause": _cause(error),
                        "retry_in_seconds": self.settings.db_timeout_seconds,
                    },
                )
                await asyncio.sleep(self.settings.db_timeout_seconds)

    async def reload_digest_roots(self) -> None:
        """Load the digest roots, new ones included: what keys the digests of codes and tokens."""
        stores = self.stores
        await load_digest_roots(stores.key_material, stores.key_store, self.services.encryption, stores.secrets_at_rest)

    async def _reload_keys(self) -> None:
        # Picks up keys rotated by `users-grpc keys rotate`, and digest roots started by
        # `users-grpc keys rotate-digest-root`, in this or any replica.
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.settings.key_reload_seconds)
            for what, reload in (
                ("signing keys", self.services.tokens.reload),
                ("digest roots", self.reload_digest_roots),
            ):
                try:
                    await reload()
                except StorageUnavailable:
                    log.warning(f"could not reload {what}")
                except ConfigError as error:
                    # Another replica sealed keys under another key-encryption key: keep the keys in hand.
                    log.error(f"could not open the {what}", extra={"cause": str(error)})

    async def start(self) -> None:
        """Listen at once (alive, not ready), prepare the database, then serve.

        Health answers from the first moment, so probes can tell a server waiting for its
        database from a dead one; UserService calls wait for :attr:`ready`.
        """
        await self.health.starting()
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        log.info("listening", extra={"port": self.port, "http_port": self.http_port})
        await self.prepare_database()
        self.ready.set()
        await self.health.check()
        self._background = [
            asyncio.create_task(self.services.mail.run()),
            asyncio.create_task(self.health.run()),
            asyncio.create_task(self._reload_keys()),
            asyncio.create_task(self.services.housekeeping.run()),
            asyncio.create_task(self.services.changes.run()),
        ]
        log.info("serving", extra={"port": self.port, "service": SERVICE_NAME})

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, let load balancers notice, finish in-flight RPCs, close."""
        await self.health_servicer.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.shutdown_delay_seconds)
        # Both edges drain at once: each stops taking calls, and those in progress get the grace period.
        await asyncio.gather(
            self.server.stop(self.settings.shutdown_grace_seconds),
            *([] if self.http is None else [self.http.stop()]),
        )
        await cancel_abandoned_work()  # the calls that waited for it are gone
        # Background work stops at its next step, so the mail in hand is delivered and marked
        # rather than sent again later. Cancelling is the fallback, and is never waited on forever.
        self.services.mail.stop()
        self.health.stop()
        self.services.housekeeping.stop()
        self.services.changes.stop()
        self._stopping.set()
        pending: set[asyncio.Task[None]] = set()
        if self._background:  # none if stopped while start-up still waited for the database
            _, pending = await asyncio.wait(self._background, timeout=self.settings.smtp_timeout_seconds + 1)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1)
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        """Release the database client and the hashing threads (after stop, or in a CLI command)."""
        if self.http is not None:
            await self.http.stop()
        await self.stores.client.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    mail_transport: MailTransport | None = None,
    tracer_provider: TracerProvider | None = None,
    event_listeners: Sequence[CommandListener | ConnectionPoolListener] = (),
    share_port: bool = False,
) -> App:
    """Build the server; with a ``tracer_provider``, calls and database commands are traced.

    With ``share_port`` both edges listen with SO_REUSEPORT, beside the other workers of
    ``users-grpc serve --workers N``, and /metrics shows every worker's (PROMETHEUS_MULTIPROC_DIR)."""
    keep_secrets_out_of_logs()
    clock = clock or SystemClock()
    key_encryption_key = _key_encryption_key(settings)
    # Before anything opens: a broken mail template stops the start with its one sentence.
    renderer = mail_renderer(settings)
    listeners = [*event_listeners, *([] if tracer_provider is None else [command_listener(tracer_provider)])]
    stores = build_stores(settings, key_encryption_key, event_listeners=listeners)
    # Hashing yields the cores to the calls it would otherwise hold up (bcrypt_hasher.yield_to_calls).
    executor = ThreadPoolExecutor(
        max_workers=settings.hash_workers, thread_name_prefix="bcrypt", initializer=yield_to_calls
    )
    # Without an HTTP address nobody can scrape metrics, so none are kept.
    metrics = None if settings.http_address is None else Metrics(shared=share_port)
    services = build_services(
        settings,
        stores,
        key_encryption_key,
        clock=clock,
        hasher=_hasher(settings, executor, metrics),
        mail_transport=mail_transport or _mail_transport(settings),
        renderer=renderer,
    )
    ready = asyncio.Event()
    server, guard, invoke = build_server(
        settings,
        stores,
        services,
        clock=clock,
        ready=ready,
        metrics=metrics,
        tracer_provider=tracer_provider,
        share_port=share_port,
    )
    # Apps served beside Connect on the HTTP edge, by path prefix (SCIM at /scim/v2), each calling
    # the RPCs through ``invoke``: the same pipeline as a gRPC call.
    http_mounts: dict[str, ASGIApp] = {"/scim/v2": ScimApp(invoke)}
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health = _database_health(settings, stores, health_servicer)
    http = None
    http_port = None
    try:
        port = _add_port(server, settings)
        if metrics is not None and settings.http_address is not None:
            metrics.read_at_scrape(_gauges(stores, services, guard, health, clock))
            edge = HttpEdge(
                metrics=metrics,
                # Byte for byte what GetPublicKeys answers.
                jwks=lambda: json.dumps(services.tokens.jwks()).encode(),
                ready=ready,
                jwks_max_age_seconds=int(settings.key_reload_seconds),
                connect=connect_app(invoke, max_body_bytes=settings.http_max_body_bytes),
                max_body_bytes=settings.http_max_body_bytes,
                mounts=http_mounts,
            )
            http = HttpServer(
                edge,
                HttpLimits(
                    max_connections=settings.http_max_connections,
                    keepalive_seconds=settings.http_keepalive_seconds,
                    shutdown_grace_seconds=settings.shutdown_grace_seconds,
                    trusted_proxies=settings.http_trusted_proxies,
                ),
            )
            http_port = http.bind(settings.http_address, reuse_port=share_port)
    except ConfigError:
        await stores.client.close()
        executor.shutdown(wait=False)
        raise
    return App(
        settings=settings,
        server=server,
        port=port,
        stores=stores,
        services=services,
        executor=executor,
        health=health,
        health_servicer=health_servicer,
        invoke=invoke,
        http=http,
        http_port=http_port,
        ready=ready,
    )


def build_stores(
    settings: Settings,
    key_encryption_key: bytes,
    *,
    event_listeners: Sequence[CommandListener | ConnectionPoolListener],
) -> Stores:
    """The database client and the stores on it; nothing is sent to the database yet."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        settings.mongodb_uri,
        # Tests and the benchmark count the commands calls send (PyMongo command monitoring). The
        # tracing listener only when tracing is on: a listener costs every database command some work.
        event_listeners=event_listeners,
        tz_aware=True,
        appname="users-grpc",
        # Bounds every operation (PyMongo CSOT), background work included; RPCs narrow it to their deadline.
        timeoutMS=int(settings.db_timeout_seconds * 1000),
        serverSelectionTimeoutMS=int(settings.db_timeout_seconds * 1000),
    )
    # Explicit, because "majority" is the default only from MongoDB 5.0 and not with some arbiters.
    database = client.get_database(settings.mongodb_database, write_concern=WriteConcern("majority"))
    secrets_at_rest = SecretsAtRest(key_encryption_key, settings.old_key_encryption_keys)
    # Wired to each other as the server runs them (adapters/mongo build_stores).
    mongo = build_mongo_stores(database, secrets_at_rest, coalesce_reads=settings.coalesce_reads)
    return Stores(
        client=client,
        database=database,
        secrets_at_rest=secrets_at_rest,
        users=mongo.users,
        outbox=mongo.outbox,
        change_log=mongo.change_log,
        sessions=mongo.sessions,
        throttles=mongo.throttles,
        service_accounts=mongo.service_accounts,
        audit_trail=mongo.audit_trail,
        schema=mongo.schema,
        key_store=mongo.keys,
        key_material=mongo.key_material,
        housekeeping=mongo.housekeeping,
        groups=mongo.groups,
    )


def _relying_party(settings: Settings) -> WebAuthnRelyingParty | None:
    """Passkeys on when the three USERS_WEBAUTHN_* settings are set; off (PASSKEYS_DISABLED) otherwise."""
    if settings.webauthn_rp_id is None or settings.webauthn_rp_name is None or not settings.webauthn_origins:
        return None
    return WebAuthnRelyingParty(
        rp_id=settings.webauthn_rp_id,
        rp_name=settings.webauthn_rp_name,
        origins=settings.webauthn_origins,
        timeout=timedelta(seconds=settings.webauthn_ceremony_seconds),
    )


def build_services(
    settings: Settings,
    stores: Stores,
    key_encryption_key: bytes,
    *,
    clock: Clock,
    hasher: BcryptHasher,
    mail_transport: MailTransport,
    renderer: MailRenderer | None = None,
) -> Services:
    """The use cases on the stores, each with its policy from the settings."""
    digests = stores.secrets_at_rest
    changes = ChangeFeed(log=stores.change_log, poll_seconds=settings.change_poll_seconds)
    stores.change_log.on_published = changes.published
    groups = GroupService(groups=stores.groups, clock=clock)
    mail = MailDelivery(
        queue=stores.outbox,
        notices=stores.users,
        transport=mail_transport,
        clock=clock,
        poll_seconds=settings.mail_poll_seconds,
        max_attempts=settings.mail_max_attempts,
        first_retry_seconds=settings.mail_retry_seconds,
    )
    password_policy = PasswordPolicy(
        min_length=settings.password_min_length, common_passwords=common_passwords(settings.password_min_length)
    )
    password_throttle = PasswordThrottle(store=stores.throttles, clock=clock, policy=_throttle_policy(settings))
    password_rules = _password_rules(settings, hasher)
    accounts = AccountService(
        users=stores.users,
        mailer=mail,
        mail_renderer=renderer or mail_renderer(settings),
        hasher=hasher,
        digests=digests,
        clock=clock,
        policy=_account_policy(settings, password_policy),
        throttle=password_throttle,
        password_rules=password_rules,
    )
    encryption = KeyEncryption(key_encryption_key, settings.old_key_encryption_keys)
    tokens = AccessTokens(
        store=stores.key_store,
        encryption=encryption,
        clock=clock,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        lifetime=timedelta(seconds=settings.access_token_ttl_seconds),
    )
    passkeys = PasskeyService(
        relying_party=_relying_party(settings),
        accounts=accounts,
        passkeys=stores.users,
        ceremonies=MongoCeremonyStore(stores.database),
        sessions=stores.sessions,
        throttle=password_throttle,
        clock=clock,
        ceremony_lifetime=timedelta(seconds=settings.webauthn_ceremony_seconds),
        reauthentication_window=timedelta(seconds=settings.webauthn_reauth_seconds),
    )
    mfa = MfaService(
        passkeys=passkeys,
        accounts=accounts,
        credentials=stores.users,
        sessions=stores.sessions,
        mailer=mail,
        encryption=encryption,
        digests=digests,
        clock=clock,
        issuer=settings.mfa_issuer,
        max_attempts=settings.mfa_max_attempts,
        attempt_window=timedelta(seconds=settings.mfa_attempt_window_seconds),
    )
    return Services(
        accounts=accounts,
        passwords=PasswordService(
            accounts=accounts,
            credentials=stores.users,
            sessions=stores.sessions,
            mailer=mail,
            hasher=hasher,
            digests=digests,
            clock=clock,
            password_policy=password_policy,
            reset_token_ttl=timedelta(seconds=settings.password_reset_ttl_seconds),
            reset_max_sends=settings.password_reset_max_sends,
            reset_send_window=timedelta(seconds=settings.password_reset_send_window_seconds),
            reply_floor=timedelta(seconds=settings.reply_floor_seconds),
            rules=password_rules,
        ),
        sessions=SessionService(
            logins=mfa,
            users=stores.users,
            sessions=stores.sessions,
            tokens=tokens,
            digests=digests,
            clock=clock,
            session_lifetime=timedelta(seconds=settings.session_ttl_seconds),
            groups=groups,
            passkeys=passkeys,
            password_rules=password_rules,
        ),
        mfa=mfa,
        email_changes=EmailChangeService(
            accounts=accounts,
            users=stores.users,
            mailer=mail,
            digests=digests,
            clock=clock,
            policy=EmailChangePolicy(
                code_ttl=timedelta(seconds=settings.email_change_code_ttl_seconds),
                max_attempts=settings.activation_max_attempts,
                max_sends=settings.activation_max_sends,
                send_window=timedelta(seconds=settings.activation_send_window_seconds),
            ),
        ),
        admin=AdminService(
            users=stores.users, sessions=stores.sessions, throttle=password_throttle, mfa=mfa, clock=clock
        ),
        service_accounts=ServiceAccountService(
            accounts=stores.service_accounts,
            tokens=tokens,
            digests=digests,
            # Secrets are checked as passwords are: the same per-account-and-source delays.
            throttle=password_throttle,
            clock=clock,
            account_tokens=ServiceAccountTokenService(
                accounts=stores.service_accounts,
                digests=digests,
                clock=clock,
                max_lifetime=timedelta(days=settings.service_account_token_max_days)
                if settings.service_account_token_max_days
                else None,
            ),
        ),
        directory=DirectoryService(users=stores.users, clock=clock),
        audit=AuditLog(trail=stores.audit_trail),
        changes=changes,
        mail=mail,
        housekeeping=HousekeepingJob(
            store=stores.housekeeping,
            clock=clock,
            retention=_retention(settings),
            interval_seconds=settings.housekeeping_interval_seconds,
            sweep_deleted_groups=groups.sweep_deleted,
        ),
        tokens=tokens,
        encryption=encryption,
        password_throttle=password_throttle,
        passkeys=passkeys,
        hasher=hasher,
        metadata=MetadataService(store=stores.users, clock=clock, writers=settings.metadata_writers),
        groups=groups,
    )


def build_server(
    settings: Settings,
    stores: Stores,
    services: Services,
    *,
    clock: Clock,
    ready: asyncio.Event,
    metrics: Metrics | None,
    tracer_provider: TracerProvider | None,
    share_port: bool = False,
) -> tuple[grpc.aio.Server, CallGuard, Invoker]:
    """The gRPC server with the pipeline's interceptor and the UserService (health is added by the
    caller), and the same calls for the HTTP edge: one pipeline around one servicer."""
    guard = CallGuard(
        ready=ready,
        db_timeout_seconds=settings.db_timeout_seconds,
        admission=Authorizer(
            sessions=services.sessions,
            service_accounts=services.service_accounts,
            machine_identities=settings.machine_identities,
            users=stores.users,
        ),
        flows=FLOWS,
        check_request=refuse_out_of_range,
        rate_limit=SourceRateLimit(
            store=stores.throttles,
            clock=clock,
            policy=RateLimitPolicy(
                budgets=_flow_budgets(settings),
                window=timedelta(seconds=settings.rate_limit_window_seconds),
            ),
        ),
        # Past this many UserService calls in progress the server answers RESOURCE_EXHAUSTED
        # instead of queueing without bound (bcrypt makes each call costly). Not the server's
        # own maximum_concurrent_rpcs, which would refuse health checks too.
        max_concurrent_calls=settings.max_concurrent_rpcs,
        # Streams apart (they stay open), each reading the change log at every poll; and a share
        # per caller, so that one admin or service cannot take every place.
        max_streams=settings.max_streams,
        max_streams_per_caller=settings.max_streams_per_caller,
    )
    pipeline = Pipeline(
        # The trace's span first, so the call's line and its database spans fall within it.
        spans=None if tracer_provider is None else CallSpans(tracer_provider, pipeline_code),
        observer=Observer(metrics=metrics, status_of=pipeline_code, trace_ids=tracer_provider is not None),
        guard=guard,
        # Inside the guard: it records admitted calls, with the caller that one found.
        audit=AuditTrail(
            table=AUDITED,
            grant_reason=ADMIN_GRANTED_ON_IMPORT,
            audit=services.audit,
            clock=clock,
            status_of=pipeline_code,
        ),
    )
    interceptor = PipelineInterceptor(method_prefix=f"/{SERVICE_NAME}/", pipeline=pipeline)
    options = [(key, 1 if key == "grpc.so_reuseport" and share_port else value) for key, value in _SERVER_OPTIONS]
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    servicer = UserServiceServicer(
        services.accounts,
        services.sessions,
        services.passwords,
        services.mfa,
        services.email_changes,
        services.admin,
        services.service_accounts,
        services.directory,
        services.audit,
        services.changes,
        services.metadata,
        services.groups,
        services.passkeys,
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    invoke = Invoker(
        method_handlers(lambda registry: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, registry)),
        pipeline,
    )
    if settings.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            SourceInfoReflectionServicer([SERVICE_NAME, health_name, reflection.SERVICE_NAME], load_descriptor_set()),
            server,
        )
    return server, guard, invoke


def _key_encryption_key(settings: Settings) -> bytes:
    if settings.key_encryption_key is None:
        raise ConfigError(
            "USERS_KEY_ENCRYPTION_KEY is required: it seals the token signing keys. For the local "
            "database of `users-grpc dev` it is in var/key-encryption-key (export "
            "USERS_KEY_ENCRYPTION_KEY=$(cat var/key-encryption-key)); for a new deployment make one "
            "with `users-grpc keys new-kek` and keep it secret."
        )
    return settings.key_encryption_key


def _database_health(settings: Settings, stores: Stores, servicer: AsyncHealthServicer) -> DatabaseHealth:
    return DatabaseHealth(
        servicer=servicer,
        services=["", SERVICE_NAME],
        ping=lambda: ping(stores.database, min(settings.db_timeout_seconds, settings.health_interval_seconds * 2)),
        interval_seconds=settings.health_interval_seconds,
    )


def _hasher(settings: Settings, executor: ThreadPoolExecutor, metrics: Metrics | None) -> BcryptHasher:
    return BcryptHasher(
        rounds=settings.bcrypt_rounds,
        executor=executor,
        workers=settings.hash_workers,
        queue_length=settings.hash_queue_length,
        pepper=settings.password_pepper,
        waited=None if metrics is None else metrics.hash_wait.observe,
    )


def _throttle_policy(settings: Settings) -> ThrottlePolicy:
    return ThrottlePolicy(
        free_attempts=settings.password_free_attempts,
        account_free_attempts=settings.password_account_free_attempts,
        window=timedelta(seconds=settings.password_attempt_window_seconds),
        max_delay=timedelta(seconds=settings.password_max_delay_seconds),
        known_source_lifetime=timedelta(seconds=settings.known_source_ttl_seconds),
    )


def _password_rules(settings: Settings, hasher: BcryptHasher) -> PasswordRules:
    breached = (
        PwnedPasswordsRange(
            url=settings.breached_password_url, timeout_seconds=settings.breached_password_timeout_seconds
        )
        if settings.breached_password_url
        else None
    )
    max_age = settings.password_max_age_seconds
    return PasswordRules(
        hasher=hasher,
        breached=breached,
        lifecycle=PasswordLifecycle(
            history=settings.password_history,
            max_age=timedelta(seconds=max_age) if max_age else None,
            change_token_lifetime=timedelta(seconds=settings.password_change_token_ttl_seconds),
            breach_check_fails_closed=settings.breached_password_fail_closed,
        ),
    )


def _account_policy(settings: Settings, password: PasswordPolicy) -> AccountPolicy:
    return AccountPolicy(
        password=password,
        activation_code_ttl=timedelta(seconds=settings.activation_code_ttl_seconds),
        activation_max_attempts=settings.activation_max_attempts,
        activation_max_sends=settings.activation_max_sends,
        activation_send_window=timedelta(seconds=settings.activation_send_window_seconds),
        activation_token_ttl=timedelta(seconds=settings.activation_token_ttl_seconds),
        reply_floor=timedelta(seconds=settings.reply_floor_seconds),
        max_imported_hash_cost=settings.bcrypt_rounds,
    )


def _retention(settings: Settings) -> Retention:
    return Retention(
        ended_sessions=timedelta(seconds=settings.session_retention_seconds),
        never_activated_accounts=timedelta(seconds=settings.unactivated_account_retention_seconds),
        failed_mail=timedelta(seconds=settings.mail_failed_retention_seconds),
        audit_events=timedelta(days=settings.audit_retention_days),
        changes=timedelta(days=settings.change_retention_days),
    )


def _gauges(stores: Stores, services: Services, guard: CallGuard, health: DatabaseHealth, clock: Clock) -> Gauges:
    return Gauges(
        hash_jobs=lambda: services.hasher.jobs,
        hash_capacity=services.hasher.capacity,
        streams_open=lambda: guard.streams_open,
        signing_key_created_at=lambda: services.tokens.signing_key_created_at,
        database_up=lambda: health.serving,
        outbox=lambda: _outbox_state(stores.outbox),
        now=clock.now,
    )


async def serve(settings: Settings, *, share_port: bool = False, on_serving: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain within the configured grace period.

    The signals are honoured at every stage, also while start-up still waits for the database.
    A worker (users_grpc/workers.py) shares its port and is told, by ``on_serving``, once it serves.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await _serve_until(stopping, settings, share_port=share_port, on_serving=on_serving)
    finally:
        # Taken back before asyncio.run closes the loop: its close shuts the loop's wakeup pipe
        # before it removes the handlers, and a signal in between (a supervisor stopping a worker
        # that failed to start) prints "Exception ignored ... signal wakeup fd" and a traceback.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _serve_until(
    stopping: asyncio.Event, settings: Settings, *, share_port: bool, on_serving: Callable[[], None] | None
) -> None:
    tracer_provider = tracer_provider_from_env()
    app = await build_app(settings, tracer_provider=tracer_provider, share_port=share_port)
    starting = asyncio.create_task(app.start())
    signalled = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start-up error (such as a wrong key-encryption key) ends here
            if on_serving is not None:
                on_serving()
            await signalled
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        log.info("shutting down")
    finally:
        signalled.cancel()
        await app.stop()
        if tracer_provider is not None:
            tracer_provider.shutdown()  # sends the spans still batched


def redacted_uri(uri: str) -> str:
    """The database URI without its password, for logs."""
    return re.sub(r"(?<=://)([^/@:]*):[^/@]*@", r"\1:***@", uri)


def _cause(error: BaseException) -> str:
    cause = error.__cause__ or error
    if isinstance(cause, ServerSelectionTimeoutError):
        return _what_the_servers_said(str(cause))
    return f"{type(cause).__name__}: {cause}"[:300]


def _what_the_servers_said(message: str) -> str:
    """PyMongo's "host:port: why" for each server, without the timeouts and the topology dump
    (500 characters and more) it appends: the line names the host and the cause."""
    said = message.split(", Timeout: ", 1)[0]
    return re.sub(r" \(configured timeouts: [^)]*\)", "", said)[:300]


def _add_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Listen in plaintext (the local default), TLS, or mTLS when a client CA is configured."""
    try:
        return _bind(server, settings)
    except RuntimeError:
        raise ConfigError(
            f"USERS_GRPC_ADDRESS={settings.grpc_address}: cannot listen there; "
            "is another server using the port, or is the address not this machine's?"
        ) from None


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return server.add_insecure_port(settings.grpc_address)
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(settings.grpc_address, credentials)


async def _outbox_state(outbox: MongoOutbox) -> OutboxState:
    pending, failed, oldest = await outbox.counts()
    return OutboxState(pending=pending, failed=failed, oldest_pending_at=oldest)


def mail_renderer(settings: Settings) -> TemplateMailRenderer:
    """The mail templates, every one compiled and tried here: a broken one stops the start."""
    return TemplateMailRenderer(
        override_dir=settings.mail_templates_dir,
        default_language=settings.mail_language,
        links=MailLinks(
            activation_url=settings.activation_url,
            reset_url=settings.reset_url,
            email_change_url=settings.email_change_url,
        ),
    )


def _mail_transport(settings: Settings) -> MailTransport:
    if settings.smtp_host is None:
        return DirectoryTransport(settings.mail_dir, settings.mail_from)
    return SmtpTransport(
        host=settings.smtp_host,
        port=settings.smtp_port,
        security=settings.smtp_security,
        username=settings.smtp_username,
        password=settings.smtp_password,
        sender=settings.mail_from,
        timeout_seconds=settings.smtp_timeout_seconds,
        ca_file=settings.smtp_ca_file,
    )


def _flow_budgets(settings: Settings) -> dict[Flow, int]:
    """Each budgeted flow's calls per source and window: its own setting, else USERS_RATE_LIMIT_REQUESTS."""
    own = {
        Flow.SIGN_UP: settings.rate_limit_sign_up_requests,
        Flow.ACTIVATION: settings.rate_limit_activation_requests,
        Flow.SIGN_IN: settings.rate_limit_sign_in_requests,
        Flow.RECOVERY: settings.rate_limit_recovery_requests,
    }
    return {flow: settings.rate_limit_requests if budget is None else budget for flow, budget in own.items()}
