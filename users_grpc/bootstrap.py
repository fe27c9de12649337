"""The composition root: the only place that builds clients, pools and the server.

Tests call :func:`build_app` with port 0 and, where they need to, their own
clock or mail transport; ``users-grpc serve`` calls :func:`serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import Sequence
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
from pymongo.errors import ServerSelectionTimeoutError
from pymongo.monitoring import CommandListener, ConnectionPoolListener

from users.v1 import user_service_pb2, user_service_pb2_grpc
from users_grpc.adapters.bcrypt_hasher import BcryptHasher, common_passwords, yield_to_calls
from users_grpc.adapters.mail_transports import DirectoryTransport, SmtpTransport
from users_grpc.adapters.mongo import build_stores
from users_grpc.adapters.mongo.audit_trail import MongoAuditTrail
from users_grpc.adapters.mongo.calls import cancel_abandoned_work, ping
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.keys import MongoKeyMaterial, MongoKeyStore
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.mongo.schema import MongoSchema, ensure_indexes
from users_grpc.adapters.mongo.service_accounts import MongoServiceAccountRepository
from users_grpc.adapters.mongo.sessions import MongoSessionRepository
from users_grpc.adapters.mongo.throttles import MongoThrottleStore
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.config import Settings
from users_grpc.domain.errors import ConfigError, StorageUnavailable
from users_grpc.domain.ports import Clock, MailTransport
from users_grpc.domain.rules import PasswordPolicy
from users_grpc.grpc_api.access import Authorizer
from users_grpc.grpc_api.audit_interceptor import AuditInterceptor
from users_grpc.grpc_api.health import DatabaseHealth
from users_grpc.grpc_api.interceptors import UserServiceInterceptor
from users_grpc.grpc_api.logs import keep_secrets_out_of_logs
from users_grpc.grpc_api.observability import Gauges, Metrics, ObservabilityInterceptor, OutboxState
from users_grpc.grpc_api.operations_http import OperationsHttp
from users_grpc.grpc_api.reflection import SourceInfoReflectionServicer, load_descriptor_set
from users_grpc.grpc_api.servicer import UserServiceServicer
from users_grpc.grpc_api.tracing import command_listener, server_interceptor, tracer_provider_from_env
from users_grpc.ops import migrations
from users_grpc.ops.rewrap import load_digest_roots
from users_grpc.services.accounts import AccountPolicy, AccountService
from users_grpc.services.admin import AdminService
from users_grpc.services.audit import AuditLog
from users_grpc.services.changes import ChangeFeed
from users_grpc.services.directory import DirectoryService
from users_grpc.services.email_change import EmailChangePolicy, EmailChangeService
from users_grpc.services.housekeeping import HousekeepingJob, Retention
from users_grpc.services.mail import MailDelivery
from users_grpc.services.mfa import MfaService
from users_grpc.services.passwords import PasswordService
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
    # port and silently answer half the calls.
    ("grpc.so_reuseport", 0),
]


class SystemClock:
    def now(self) -> datetime:
        # MongoDB keeps milliseconds: a time cut there before its first write is returned the
        # same by the call that made it (CreateUser's created_at) and by every later read.
        now = datetime.now(UTC)
        return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass
class App:
    """A built server and its background work; :meth:`start` it, then :meth:`stop` it."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    client: AsyncMongoClient[Document]
    executor: ThreadPoolExecutor
    users: MongoUserRepository
    outbox: MongoOutbox
    session_store: MongoSessionRepository
    throttles: MongoThrottleStore
    service_account_store: MongoServiceAccountRepository
    schema: MongoSchema
    audit_trail: MongoAuditTrail
    accounts: AccountService
    tokens: AccessTokens
    health: DatabaseHealth
    health_servicer: AsyncHealthServicer
    mail: MailDelivery
    housekeeping: HousekeepingJob
    encryption: KeyEncryption
    secrets_at_rest: SecretsAtRest
    key_store: MongoKeyStore
    key_material: MongoKeyMaterial
    changes: ChangeFeed
    # /metrics and the key set over HTTP, when USERS_HTTP_ADDRESS is set.
    http: OperationsHttp | None = None
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
                await ensure_indexes(
                    users=self.users,
                    outbox=self.outbox,
                    sessions=self.session_store,
                    throttles=self.throttles,
                    service_accounts=self.service_account_store,
                    audit_trail=self.audit_trail,
                )
                version = await migrations.prepare(self.schema)
                self.users.lookups_by_claim = version >= migrations.CLAIMS_COMPLETE
                await self.outbox.seal_legacy_mail()
                await self.tokens.ensure_signing_key()
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
        await load_digest_roots(self.key_material, self.key_store, self.encryption, self.secrets_at_rest)

    async def _reload_keys(self) -> None:
        # Picks up keys rotated by `users-grpc keys rotate`, and digest roots started by
        # `users-grpc keys rotate-digest-root`, in this or any replica.
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.settings.key_reload_seconds)
            for what, reload in (("signing keys", self.tokens.reload), ("digest roots", self.reload_digest_roots)):
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
            asyncio.create_task(self.mail.run()),
            asyncio.create_task(self.health.run()),
            asyncio.create_task(self._reload_keys()),
            asyncio.create_task(self.housekeeping.run()),
            asyncio.create_task(self.changes.run()),
        ]
        log.info("serving", extra={"port": self.port, "service": SERVICE_NAME})

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, let load balancers notice, finish in-flight RPCs, close."""
        await self.health_servicer.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.shutdown_delay_seconds)
        await self.server.stop(self.settings.shutdown_grace_seconds)
        await cancel_abandoned_work()  # the calls that waited for it are gone
        # Background work stops at its next step, so the mail in hand is delivered and marked
        # rather than sent again later. Cancelling is the fallback, and is never waited on forever.
        self.mail.stop()
        self.health.stop()
        self.housekeeping.stop()
        self.changes.stop()
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
        await self.client.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    mail_transport: MailTransport | None = None,
    tracer_provider: TracerProvider | None = None,
    event_listeners: Sequence[CommandListener | ConnectionPoolListener] = (),
) -> App:
    """Build the server; with a ``tracer_provider``, calls and database commands are traced."""
    keep_secrets_out_of_logs()
    clock = clock or SystemClock()
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        settings.mongodb_uri,
        # Tests and the benchmark count the commands calls send (PyMongo command monitoring). The
        # tracing listener only when tracing is on: a listener costs every database command some work.
        event_listeners=[*event_listeners, *([] if tracer_provider is None else [command_listener(tracer_provider)])],
        tz_aware=True,
        appname="users-grpc",
        # Bounds every operation (PyMongo CSOT), background work included; RPCs narrow it to their deadline.
        timeoutMS=int(settings.db_timeout_seconds * 1000),
        serverSelectionTimeoutMS=int(settings.db_timeout_seconds * 1000),
    )
    # Explicit, because "majority" is the default only from MongoDB 5.0 and not with some arbiters.
    database = client.get_database(settings.mongodb_database, write_concern=WriteConcern("majority"))
    if settings.key_encryption_key is None:
        raise ConfigError(
            "USERS_KEY_ENCRYPTION_KEY is required: it seals the token signing keys. For the local "
            "database of `users-grpc dev` it is in var/key-encryption-key (export "
            "USERS_KEY_ENCRYPTION_KEY=$(cat var/key-encryption-key)); for a new deployment make one "
            "with `users-grpc keys new-kek` and keep it secret."
        )
    # Digests of codes and tokens, and sealed mail bodies, under keys derived from the key-encryption key.
    secrets_at_rest = SecretsAtRest(settings.key_encryption_key, settings.old_key_encryption_keys)
    stores = build_stores(database, secrets_at_rest)
    outbox, change_log, users = stores.outbox, stores.change_log, stores.users
    changes = ChangeFeed(log=change_log, poll_seconds=settings.change_poll_seconds)
    change_log.on_published = changes.published
    session_store = stores.sessions

    # Hashing yields the cores to the calls it would otherwise hold up (passwords.yield_to_calls).
    executor = ThreadPoolExecutor(
        max_workers=settings.hash_workers, thread_name_prefix="bcrypt", initializer=yield_to_calls
    )
    # Without an HTTP address nobody can scrape metrics, so none are kept.
    metrics = None if settings.http_address is None else Metrics()
    hasher = BcryptHasher(
        rounds=settings.bcrypt_rounds,
        executor=executor,
        workers=settings.hash_workers,
        queue_length=settings.hash_queue_length,
        pepper=settings.password_pepper,
        waited=None if metrics is None else metrics.hash_wait.observe,
    )
    throttles = stores.throttles
    mail = MailDelivery(
        queue=outbox,
        notices=users,
        transport=mail_transport or _mail_transport(settings),
        clock=clock,
        poll_seconds=settings.mail_poll_seconds,
        max_attempts=settings.mail_max_attempts,
        first_retry_seconds=settings.mail_retry_seconds,
    )
    password_policy = PasswordPolicy(
        min_length=settings.password_min_length, common_passwords=common_passwords(settings.password_min_length)
    )
    password_throttle = PasswordThrottle(
        store=throttles,
        clock=clock,
        policy=ThrottlePolicy(
            free_attempts=settings.password_free_attempts,
            account_free_attempts=settings.password_account_free_attempts,
            window=timedelta(seconds=settings.password_attempt_window_seconds),
            max_delay=timedelta(seconds=settings.password_max_delay_seconds),
            known_source_lifetime=timedelta(seconds=settings.known_source_ttl_seconds),
        ),
    )
    accounts = AccountService(
        users=users,
        mailer=mail,
        hasher=hasher,
        digests=secrets_at_rest,
        clock=clock,
        policy=AccountPolicy(
            password=password_policy,
            activation_code_ttl=timedelta(seconds=settings.activation_code_ttl_seconds),
            activation_max_attempts=settings.activation_max_attempts,
            activation_max_sends=settings.activation_max_sends,
            activation_send_window=timedelta(seconds=settings.activation_send_window_seconds),
            activation_token_ttl=timedelta(seconds=settings.activation_token_ttl_seconds),
            reply_floor=timedelta(seconds=settings.reply_floor_seconds),
            max_imported_hash_cost=settings.bcrypt_rounds,
        ),
        throttle=password_throttle,
    )
    encryption = KeyEncryption(settings.key_encryption_key, settings.old_key_encryption_keys)
    key_store = stores.keys
    tokens = AccessTokens(
        store=key_store,
        encryption=encryption,
        clock=clock,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        lifetime=timedelta(seconds=settings.access_token_ttl_seconds),
    )
    mfa = MfaService(
        accounts=accounts,
        credentials=users,
        sessions=session_store,
        mailer=mail,
        encryption=encryption,
        digests=secrets_at_rest,
        clock=clock,
        issuer=settings.mfa_issuer,
        max_attempts=settings.mfa_max_attempts,
        attempt_window=timedelta(seconds=settings.mfa_attempt_window_seconds),
    )
    email_changes = EmailChangeService(
        accounts=accounts,
        users=users,
        mailer=mail,
        digests=secrets_at_rest,
        clock=clock,
        policy=EmailChangePolicy(
            code_ttl=timedelta(seconds=settings.email_change_code_ttl_seconds),
            max_attempts=settings.activation_max_attempts,
            max_sends=settings.activation_max_sends,
            send_window=timedelta(seconds=settings.activation_send_window_seconds),
        ),
    )
    passwords = PasswordService(
        accounts=accounts,
        credentials=users,
        sessions=session_store,
        mailer=mail,
        hasher=hasher,
        digests=secrets_at_rest,
        clock=clock,
        password_policy=password_policy,
        reset_token_ttl=timedelta(seconds=settings.password_reset_ttl_seconds),
        reset_max_sends=settings.password_reset_max_sends,
        reset_send_window=timedelta(seconds=settings.password_reset_send_window_seconds),
        reply_floor=timedelta(seconds=settings.reply_floor_seconds),
    )
    service_account_store = stores.service_accounts
    service_accounts = ServiceAccountService(
        accounts=service_account_store,
        tokens=tokens,
        digests=secrets_at_rest,
        # Secrets are checked as passwords are: the same per-account-and-source delays.
        throttle=password_throttle,
        clock=clock,
    )
    sessions = SessionService(
        logins=mfa,
        users=users,
        sessions=session_store,
        tokens=tokens,
        digests=secrets_at_rest,
        clock=clock,
        session_lifetime=timedelta(seconds=settings.session_ttl_seconds),
    )

    audit_trail = stores.audit_trail
    audit = AuditLog(trail=audit_trail)
    ready = asyncio.Event()
    access = UserServiceInterceptor(
        method_prefix=f"/{SERVICE_NAME}/",
        ready=ready,
        db_timeout_seconds=settings.db_timeout_seconds,
        authorizer=Authorizer(
            sessions=sessions,
            service_accounts=service_accounts,
            machine_identities=settings.machine_identities,
        ),
        rate_limit=SourceRateLimit(
            store=throttles,
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
    server = grpc.aio.server(
        interceptors=[
            # The trace's span first, so the call's line and its database spans fall within it.
            *([] if tracer_provider is None else [server_interceptor(tracer_provider)]),
            ObservabilityInterceptor(
                method_prefix=f"/{SERVICE_NAME}/", metrics=metrics, trace_ids=tracer_provider is not None
            ),
            access,
            # Inside the access interceptor: it records admitted calls, with the caller that one found.
            AuditInterceptor(method_prefix=f"/{SERVICE_NAME}/", audit=audit, clock=clock),
        ],
        options=_SERVER_OPTIONS,
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(
        UserServiceServicer(
            accounts,
            sessions,
            passwords,
            mfa,
            email_changes,
            AdminService(users=users, sessions=session_store, throttle=password_throttle, mfa=mfa, clock=clock),
            service_accounts,
            DirectoryService(users=users, clock=clock),
            audit,
            changes,
        ),
        server,
    )
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            SourceInfoReflectionServicer([SERVICE_NAME, health_name, reflection.SERVICE_NAME], load_descriptor_set()),
            server,
        )
    health = DatabaseHealth(
        servicer=health_servicer,
        services=["", SERVICE_NAME],
        ping=lambda: ping(database, min(settings.db_timeout_seconds, settings.health_interval_seconds * 2)),
        interval_seconds=settings.health_interval_seconds,
    )
    http = None
    http_port = None
    try:
        port = _add_port(server, settings)
        if metrics is not None and settings.http_address is not None:
            metrics.read_at_scrape(
                Gauges(
                    hash_jobs=lambda: hasher.jobs,
                    hash_capacity=hasher.capacity,
                    streams_open=lambda: access.streams_open,
                    signing_key_created_at=lambda: tokens.signing_key_created_at,
                    database_up=lambda: health.serving,
                    outbox=lambda: _outbox_state(outbox),
                    now=clock.now,
                )
            )
            http = OperationsHttp(
                metrics=metrics,
                # Byte for byte what GetPublicKeys answers.
                jwks=lambda: json.dumps(tokens.jwks()).encode(),
                ready=ready,
                jwks_max_age_seconds=int(settings.key_reload_seconds),
                max_connections=settings.http_max_connections,
            )
            http_port = await http.bind(settings.http_address)
    except ConfigError:
        await client.close()
        executor.shutdown(wait=False)
        raise

    return App(
        settings=settings,
        server=server,
        port=port,
        ready=ready,
        client=client,
        executor=executor,
        users=users,
        outbox=outbox,
        session_store=session_store,
        throttles=throttles,
        service_account_store=service_account_store,
        schema=stores.schema,
        audit_trail=audit_trail,
        accounts=accounts,
        tokens=tokens,
        health=health,
        http=http,
        http_port=http_port,
        health_servicer=health_servicer,
        encryption=encryption,
        secrets_at_rest=secrets_at_rest,
        key_store=key_store,
        key_material=stores.key_material,
        mail=mail,
        housekeeping=HousekeepingJob(
            store=stores.housekeeping,
            clock=clock,
            retention=Retention(
                ended_sessions=timedelta(seconds=settings.session_retention_seconds),
                never_activated_accounts=timedelta(seconds=settings.unactivated_account_retention_seconds),
                failed_mail=timedelta(seconds=settings.mail_failed_retention_seconds),
                audit_events=timedelta(days=settings.audit_retention_days),
                changes=timedelta(days=settings.change_retention_days),
            ),
            interval_seconds=settings.housekeeping_interval_seconds,
        ),
        changes=changes,
    )


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain within the configured grace period.

    The signals are honoured at every stage, also while start-up still waits for the database.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    tracer_provider = tracer_provider_from_env()
    app = await build_app(settings, tracer_provider=tracer_provider)
    starting = asyncio.create_task(app.start())
    signalled = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start-up error (such as a wrong key-encryption key) ends here
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
