"""Settings, read once from ``USERS_*`` environment variables.

Every variable, its default and its meaning is listed in ``.env.example``; a
bad value stops start-up with a :class:`ConfigError` that names the variable.
"""

from __future__ import annotations

import difflib
import email.policy
import ipaddress
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address, AddressHeader, BaseHeader
from pathlib import Path
from typing import Literal, TypeVar, cast

from users_grpc.domain import base64url
from users_grpc.domain.errors import ConfigError

SmtpSecurity = Literal["starttls", "tls", "none"]

_T = TypeVar("_T")


# Read by one command, not into Settings: known, so never reported as a typo.
# Each change compares the new password with this many hashes, one bcrypt run each: bounded so a
# change costs at most this many sign-ins' worth of hashing (24 is also Windows' and Keycloak's cap).
MAX_PASSWORD_HISTORY = 24
# The cheapest bcrypt cost a deployment may run with (USERS_BCRYPT_ROUNDS' floor). Only a test
# server goes below it, and only by a flag no variable sets (Settings.insecure_bcrypt_for_tests).
MIN_BCRYPT_ROUNDS = 10
READ_BY_COMMANDS = frozenset({"USERS_ADMIN_PASSWORD", "USERS_DEV_DB_BINARY"})


def cores() -> int:
    """The cores this process may run on (its affinity: a container's cpuset, taskset), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class UnknownVariable:
    """A ``USERS_*`` variable no setting reads: most likely a typo, which would otherwise leave
    its setting at the default without a word."""

    name: str
    nearest: str | None


@dataclass(frozen=True, kw_only=True)
class Settings:
    grpc_address: str = "127.0.0.1:50051"
    max_concurrent_rpcs: int = 200
    max_streams: int = 100
    max_streams_per_caller: int = 10
    reflection: bool = True
    shutdown_grace_seconds: float = 10.0
    shutdown_delay_seconds: float = 0.0
    # Processes serving the one address (users_grpc/workers.py); 1 serves in this process.
    workers: int = field(default_factory=cores)

    mongodb_uri: str = "mongodb://127.0.0.1:27017/"
    mongodb_database: str = "users"
    db_timeout_seconds: float = 5.0
    health_interval_seconds: float = 5.0
    # Reads of users by _id in the same event-loop turn sent as one find (adapters/mongo/read_batches.py).
    coalesce_reads: bool = True

    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_security: SmtpSecurity = "starttls"
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_timeout_seconds: float = 10.0
    smtp_ca_file: Path | None = None
    # Parsed once, here; mails build their From header and envelope sender from its parts.
    mail_from: Address = field(
        default_factory=lambda: Address(display_name="users-grpc", username="no-reply", domain="localhost")
    )
    mail_dir: Path = Path("var/mail")
    mail_poll_seconds: float = 5.0
    mail_max_attempts: int = 20
    mail_retry_seconds: float = 5.0
    mail_failed_retention_seconds: int = 7 * 86400
    # Templates that override the shipped ones, file by file (users_grpc/adapters/mail_templates/).
    mail_templates_dir: Path | None = None
    mail_language: str = "en"
    # The front end's pages mails link to, the token (or code) in the URL's fragment; None: no link.
    activation_url: str | None = None
    reset_url: str | None = None
    email_change_url: str | None = None

    password_min_length: int = 12
    password_pepper: str | None = None
    bcrypt_rounds: int = 12
    # Tests only: lets bcrypt_rounds go below MIN_BCRYPT_ROUNDS (to 4, bcrypt's least), so that the
    # suite's hundreds of server starts and sign-ins hash cheaply. No USERS_* variable sets it, so
    # nothing read from the environment can run at a cost the floor refuses.
    insecure_bcrypt_for_tests: bool = False
    password_free_attempts: int = 5
    password_account_free_attempts: int = 20
    password_attempt_window_seconds: int = 900
    password_max_delay_seconds: int = 900
    known_source_ttl_seconds: int = 30 * 86400
    rate_limit_requests: int = 60
    # Each flow's own budget per source and window; None: rate_limit_requests.
    rate_limit_sign_up_requests: int | None = None
    rate_limit_activation_requests: int | None = None
    rate_limit_sign_in_requests: int | None = None
    rate_limit_recovery_requests: int | None = None
    rate_limit_window_seconds: int = 60
    # from_env: the cores ÷ USERS_WORKERS, so 1 beside the default one worker per core.
    hash_workers: int = 1
    hash_queue_length: int = 16
    reply_floor_seconds: float = 0.2

    activation_code_ttl_seconds: int = 900
    activation_max_attempts: int = 5
    activation_max_sends: int = 5
    activation_send_window_seconds: int = 3600
    activation_token_ttl_seconds: int = 86400
    unactivated_account_retention_seconds: int = 7 * 86400
    email_change_code_ttl_seconds: int = 900

    # As long as the send window: the newest mail stays usable however a stranger spends the sends.
    password_reset_ttl_seconds: int = 3600
    password_reset_max_sends: int = 3
    password_reset_send_window_seconds: int = 3600
    # Password policy (docs/security.md): the last N passwords may not be chosen again (0: off);
    # a password older than the maximum age must be changed at sign-in (0: never expires);
    # the breached-password range API (empty: no check), its timeout and whether it fails closed.
    password_history: int = 5
    password_max_age_seconds: int = 0
    password_change_token_ttl_seconds: int = 300
    breached_password_url: str = ""
    breached_password_timeout_seconds: float = 2.0
    breached_password_fail_closed: bool = False
    mfa_issuer: str = "users-grpc"
    mfa_max_attempts: int = 5
    mfa_attempt_window_seconds: int = 300
    # Passkeys (WebAuthn): all three set, or passkeys are off (their RPCs answer PASSKEYS_DISABLED).
    webauthn_rp_id: str | None = None
    webauthn_rp_name: str | None = None
    webauthn_origins: tuple[str, ...] = ()
    webauthn_ceremony_seconds: int = 300
    # How recent a sign-in lets a passkey be added or removed without the password.
    webauthn_reauth_seconds: int = 300

    jwt_issuer: str = "users-grpc"
    jwt_audience: str = "users-grpc"
    access_token_ttl_seconds: int = 900
    # The longest a service-account token (CreateServiceAccountToken) may live, and the lifetime of
    # one made without an expire_time; 0: no maximum, and such a token never expires. GitHub's
    # fine-grained tokens default to a year at most too: an IdP's token is rotated at least yearly.
    service_account_token_max_days: int = 366
    session_ttl_seconds: int = 30 * 86400
    session_retention_seconds: int = 7 * 86400
    key_encryption_key: bytes | None = field(default=None, repr=False)
    # During a rotation: keys that still open what they sealed; nothing is sealed under them.
    old_key_encryption_keys: tuple[bytes, ...] = field(default=(), repr=False)
    key_reload_seconds: float = 60.0
    machine_identities: frozenset[str] = frozenset()
    # Machine callers that may write user metadata (services/metadata.py); the others only read it.
    metadata_writers: frozenset[str] = frozenset()

    housekeeping_interval_seconds: float = 300.0
    audit_retention_days: int = 365

    change_poll_seconds: float = 1.0
    change_retention_days: int = 7

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    log_level: str = "INFO"
    # /metrics and /.well-known/jwks.json; None serves no HTTP (`users-grpc dev` turns it on).
    http_address: str | None = None
    # Connections the HTTP endpoint serves at once; more are answered 503 and closed at once.
    http_max_connections: int = 64
    # The largest HTTP request body served (413 past it): gRPC's own message limit.
    http_max_body_bytes: int = 1024 * 1024
    # How long an idle HTTP/1.1 keep-alive connection is held open.
    http_keepalive_seconds: float = 5.0
    # The ingress or proxies (addresses, CIDR networks) whose X-Forwarded-For names the HTTP caller's
    # address; empty: the peer is the caller (behind an ingress, every caller is the ingress).
    http_trusted_proxies: tuple[str, ...] = ()

    # What from_env found set but read by no one; logged once at start (config.py has no logger).
    unknown_variables: tuple[UnknownVariable, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.bcrypt_rounds < MIN_BCRYPT_ROUNDS and not self.insecure_bcrypt_for_tests:
            raise ConfigError(f"bcrypt_rounds={self.bcrypt_rounds}: below the floor of {MIN_BCRYPT_ROUNDS}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (the process environment by default)."""
        environ = os.environ if environ is None else environ
        env = _Reader(environ)
        defaults = cls()
        smtp_security = env.get("USERS_SMTP_SECURITY", defaults.smtp_security, _smtp_security)
        workers = env.integer("USERS_WORKERS", defaults.workers, 1, 256)
        settings = cls(
            grpc_address=env.get("USERS_GRPC_ADDRESS", defaults.grpc_address, _host_port),
            reflection=env.get("USERS_REFLECTION", defaults.reflection, _bool),
            max_concurrent_rpcs=env.integer("USERS_MAX_CONCURRENT_RPCS", defaults.max_concurrent_rpcs, 1, 100000),
            max_streams=env.integer("USERS_MAX_STREAMS", defaults.max_streams, 1, 100000),
            max_streams_per_caller=env.integer(
                "USERS_MAX_STREAMS_PER_CALLER", defaults.max_streams_per_caller, 1, 100000
            ),
            shutdown_grace_seconds=env.number("USERS_SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_seconds, 0, 300),
            shutdown_delay_seconds=env.number("USERS_SHUTDOWN_DELAY_SECONDS", defaults.shutdown_delay_seconds, 0, 300),
            workers=workers,
            mongodb_uri=env.get("USERS_MONGODB_URI", defaults.mongodb_uri, _mongodb_uri),
            mongodb_database=env.get("USERS_MONGODB_DATABASE", defaults.mongodb_database, _database_name),
            db_timeout_seconds=env.number("USERS_DB_TIMEOUT_SECONDS", defaults.db_timeout_seconds, 0.1, 120),
            health_interval_seconds=env.number(
                "USERS_HEALTH_INTERVAL_SECONDS", defaults.health_interval_seconds, 0.05, 300
            ),
            coalesce_reads=env.get("USERS_COALESCE_READS", defaults.coalesce_reads, _bool),
            smtp_host=env.get("USERS_SMTP_HOST", defaults.smtp_host, str) or None,
            smtp_port=env.integer("USERS_SMTP_PORT", defaults.smtp_port, 1, 65535),
            smtp_security=smtp_security,
            smtp_username=env.get("USERS_SMTP_USERNAME", defaults.smtp_username, str) or None,
            smtp_password=env.get("USERS_SMTP_PASSWORD", defaults.smtp_password, str) or None,
            smtp_timeout_seconds=env.number("USERS_SMTP_TIMEOUT_SECONDS", defaults.smtp_timeout_seconds, 0.1, 300),
            smtp_ca_file=env.get("USERS_SMTP_CA_FILE", defaults.smtp_ca_file, _existing_file),
            mail_from=env.get("USERS_MAIL_FROM", defaults.mail_from, _mail_from),
            mail_dir=env.get("USERS_MAIL_DIR", defaults.mail_dir, Path),
            mail_poll_seconds=env.number("USERS_MAIL_POLL_SECONDS", defaults.mail_poll_seconds, 0.05, 3600),
            mail_max_attempts=env.integer("USERS_MAIL_MAX_ATTEMPTS", defaults.mail_max_attempts, 1, 1000),
            mail_retry_seconds=env.number("USERS_MAIL_RETRY_SECONDS", defaults.mail_retry_seconds, 0.05, 3600),
            mail_failed_retention_seconds=env.integer(
                "USERS_MAIL_FAILED_RETENTION_SECONDS", defaults.mail_failed_retention_seconds, 0, 365 * 86400
            ),
            mail_templates_dir=env.get("USERS_MAIL_TEMPLATES_DIR", defaults.mail_templates_dir, _existing_directory),
            mail_language=env.get("USERS_MAIL_LANGUAGE", defaults.mail_language, _language),
            activation_url=env.get("USERS_ACTIVATION_URL", defaults.activation_url, _link_url),
            reset_url=env.get("USERS_RESET_URL", defaults.reset_url, _link_url),
            email_change_url=env.get("USERS_EMAIL_CHANGE_URL", defaults.email_change_url, _link_url),
            password_min_length=env.integer("USERS_PASSWORD_MIN_LENGTH", defaults.password_min_length, 12, 64),
            password_pepper=env.get("USERS_PASSWORD_PEPPER", defaults.password_pepper, str) or None,
            bcrypt_rounds=env.integer("USERS_BCRYPT_ROUNDS", defaults.bcrypt_rounds, MIN_BCRYPT_ROUNDS, 16),
            password_free_attempts=env.integer("USERS_PASSWORD_FREE_ATTEMPTS", defaults.password_free_attempts, 1, 100),
            password_account_free_attempts=env.integer(
                "USERS_PASSWORD_ACCOUNT_FREE_ATTEMPTS", defaults.password_account_free_attempts, 1, 100
            ),
            password_attempt_window_seconds=env.integer(
                "USERS_PASSWORD_ATTEMPT_WINDOW_SECONDS", defaults.password_attempt_window_seconds, 10, 86400
            ),
            password_max_delay_seconds=env.integer(
                "USERS_PASSWORD_MAX_DELAY_SECONDS", defaults.password_max_delay_seconds, 1, 86400
            ),
            known_source_ttl_seconds=env.integer(
                "USERS_KNOWN_SOURCE_TTL_SECONDS", defaults.known_source_ttl_seconds, 60, 365 * 86400
            ),
            rate_limit_requests=env.integer("USERS_RATE_LIMIT_REQUESTS", defaults.rate_limit_requests, 1, 1_000_000),
            rate_limit_sign_up_requests=env.optional_integer("USERS_RATE_LIMIT_SIGN_UP_REQUESTS", 60, 1, 1_000_000),
            rate_limit_activation_requests=env.optional_integer(
                "USERS_RATE_LIMIT_ACTIVATION_REQUESTS", 60, 1, 1_000_000
            ),
            rate_limit_sign_in_requests=env.optional_integer("USERS_RATE_LIMIT_SIGN_IN_REQUESTS", 60, 1, 1_000_000),
            rate_limit_recovery_requests=env.optional_integer("USERS_RATE_LIMIT_RECOVERY_REQUESTS", 60, 1, 1_000_000),
            rate_limit_window_seconds=env.integer(
                "USERS_RATE_LIMIT_WINDOW_SECONDS", defaults.rate_limit_window_seconds, 1, 86400
            ),
            # The cores shared among the workers: N workers hashing on all of them would only queue.
            hash_workers=env.integer("USERS_HASH_WORKERS", max(1, cores() // workers), 1, 256),
            hash_queue_length=env.integer("USERS_HASH_QUEUE_LENGTH", defaults.hash_queue_length, 0, 10000),
            reply_floor_seconds=env.number("USERS_REPLY_FLOOR_SECONDS", defaults.reply_floor_seconds, 0.01, 5),
            activation_code_ttl_seconds=env.integer(
                "USERS_ACTIVATION_CODE_TTL_SECONDS", defaults.activation_code_ttl_seconds, 60, 7 * 86400
            ),
            activation_max_attempts=env.integer(
                "USERS_ACTIVATION_MAX_ATTEMPTS", defaults.activation_max_attempts, 1, 20
            ),
            activation_max_sends=env.integer("USERS_ACTIVATION_MAX_SENDS", defaults.activation_max_sends, 1, 100),
            activation_token_ttl_seconds=env.integer(
                "USERS_ACTIVATION_TOKEN_TTL_SECONDS", defaults.activation_token_ttl_seconds, 60, 7 * 86400
            ),
            activation_send_window_seconds=env.integer(
                "USERS_ACTIVATION_SEND_WINDOW_SECONDS", defaults.activation_send_window_seconds, 60, 7 * 86400
            ),
            unactivated_account_retention_seconds=env.integer(
                "USERS_UNACTIVATED_ACCOUNT_RETENTION_SECONDS",
                defaults.unactivated_account_retention_seconds,
                3600,
                365 * 86400,
            ),
            email_change_code_ttl_seconds=env.integer(
                "USERS_EMAIL_CHANGE_CODE_TTL_SECONDS", defaults.email_change_code_ttl_seconds, 60, 86400
            ),
            password_reset_ttl_seconds=env.integer(
                "USERS_PASSWORD_RESET_TTL_SECONDS", defaults.password_reset_ttl_seconds, 60, 86400
            ),
            password_reset_max_sends=env.integer(
                "USERS_PASSWORD_RESET_MAX_SENDS", defaults.password_reset_max_sends, 1, 100
            ),
            password_reset_send_window_seconds=env.integer(
                "USERS_PASSWORD_RESET_SEND_WINDOW_SECONDS", defaults.password_reset_send_window_seconds, 60, 7 * 86400
            ),
            mfa_issuer=env.get("USERS_MFA_ISSUER", defaults.mfa_issuer, str),
            mfa_max_attempts=env.integer("USERS_MFA_MAX_ATTEMPTS", defaults.mfa_max_attempts, 1, 100),
            mfa_attempt_window_seconds=env.integer(
                "USERS_MFA_ATTEMPT_WINDOW_SECONDS", defaults.mfa_attempt_window_seconds, 10, 86400
            ),
            webauthn_rp_id=env.get("USERS_WEBAUTHN_RP_ID", defaults.webauthn_rp_id, _rp_id),
            webauthn_rp_name=env.get("USERS_WEBAUTHN_RP_NAME", defaults.webauthn_rp_name, str),
            webauthn_origins=env.get("USERS_WEBAUTHN_ORIGINS", defaults.webauthn_origins, _origins),
            webauthn_ceremony_seconds=env.integer(
                "USERS_WEBAUTHN_CEREMONY_SECONDS", defaults.webauthn_ceremony_seconds, 30, 3600
            ),
            webauthn_reauth_seconds=env.integer(
                "USERS_WEBAUTHN_REAUTH_SECONDS", defaults.webauthn_reauth_seconds, 0, 86400
            ),
            password_history=env.integer("USERS_PASSWORD_HISTORY", defaults.password_history, 0, MAX_PASSWORD_HISTORY),
            password_max_age_seconds=env.integer(
                "USERS_PASSWORD_MAX_AGE_SECONDS", defaults.password_max_age_seconds, 0, 10 * 365 * 86400
            ),
            password_change_token_ttl_seconds=env.integer(
                "USERS_PASSWORD_CHANGE_TOKEN_TTL_SECONDS", defaults.password_change_token_ttl_seconds, 30, 3600
            ),
            breached_password_url=env.get("USERS_BREACHED_PASSWORD_URL", defaults.breached_password_url, _range_url),
            breached_password_timeout_seconds=env.number(
                "USERS_BREACHED_PASSWORD_TIMEOUT_SECONDS", defaults.breached_password_timeout_seconds, 0.1, 30
            ),
            breached_password_fail_closed=env.get(
                "USERS_BREACHED_PASSWORD_FAIL_CLOSED", defaults.breached_password_fail_closed, _bool
            ),
            jwt_issuer=env.get("USERS_JWT_ISSUER", defaults.jwt_issuer, str),
            jwt_audience=env.get("USERS_JWT_AUDIENCE", defaults.jwt_audience, str),
            access_token_ttl_seconds=env.integer(
                "USERS_ACCESS_TOKEN_TTL_SECONDS", defaults.access_token_ttl_seconds, 60, 86400
            ),
            service_account_token_max_days=env.integer(
                "USERS_SERVICE_ACCOUNT_TOKEN_MAX_DAYS", defaults.service_account_token_max_days, 0, 3660
            ),
            session_ttl_seconds=env.integer(
                "USERS_SESSION_TTL_SECONDS", defaults.session_ttl_seconds, 300, 365 * 86400
            ),
            session_retention_seconds=env.integer(
                "USERS_SESSION_RETENTION_SECONDS", defaults.session_retention_seconds, 0, 365 * 86400
            ),
            housekeeping_interval_seconds=env.number(
                "USERS_HOUSEKEEPING_INTERVAL_SECONDS", defaults.housekeeping_interval_seconds, 1, 86400
            ),
            change_poll_seconds=env.number("USERS_CHANGE_POLL_SECONDS", defaults.change_poll_seconds, 0.05, 60),
            change_retention_days=env.integer("USERS_CHANGE_RETENTION_DAYS", defaults.change_retention_days, 1, 3650),
            audit_retention_days=env.integer("USERS_AUDIT_RETENTION_DAYS", defaults.audit_retention_days, 1, 3650),
            key_encryption_key=env.get(
                "USERS_KEY_ENCRYPTION_KEY", defaults.key_encryption_key, _key_encryption_key, secret=True
            ),
            old_key_encryption_keys=env.get(
                "USERS_OLD_KEY_ENCRYPTION_KEYS", defaults.old_key_encryption_keys, _old_key_encryption_keys, secret=True
            ),
            key_reload_seconds=env.number("USERS_KEY_RELOAD_SECONDS", defaults.key_reload_seconds, 1, 3600),
            machine_identities=env.get("USERS_MACHINE_IDENTITIES", defaults.machine_identities, _names),
            metadata_writers=env.get("USERS_METADATA_WRITERS", defaults.metadata_writers, _names),
            tls_cert_file=env.get("USERS_TLS_CERT_FILE", defaults.tls_cert_file, _existing_file),
            tls_key_file=env.get("USERS_TLS_KEY_FILE", defaults.tls_key_file, _existing_file),
            tls_client_ca_file=env.get("USERS_TLS_CLIENT_CA_FILE", defaults.tls_client_ca_file, _existing_file),
            log_level=env.get("USERS_LOG_LEVEL", defaults.log_level, _log_level),
            http_address=env.get("USERS_HTTP_ADDRESS", defaults.http_address, _host_port),
            http_max_connections=env.integer("USERS_HTTP_MAX_CONNECTIONS", defaults.http_max_connections, 1, 100000),
            http_max_body_bytes=env.integer(
                "USERS_HTTP_MAX_BODY_BYTES", defaults.http_max_body_bytes, 1024, 64 * 1024 * 1024
            ),
            http_keepalive_seconds=env.number(
                "USERS_HTTP_KEEPALIVE_SECONDS", defaults.http_keepalive_seconds, 0.1, 300
            ),
            http_trusted_proxies=env.get("USERS_HTTP_TRUSTED_PROXIES", defaults.http_trusted_proxies, _networks),
            unknown_variables=_unknown_variables(environ, env.read | READ_BY_COMMANDS),
        )
        if settings.unactivated_account_retention_seconds < settings.activation_code_ttl_seconds:
            raise ConfigError(
                "USERS_UNACTIVATED_ACCOUNT_RETENTION_SECONDS must be at least USERS_ACTIVATION_CODE_TTL_SECONDS: "
                "an account must outlive its activation code"
            )
        if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
            raise ConfigError("USERS_TLS_CERT_FILE and USERS_TLS_KEY_FILE must be set together")
        if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
            raise ConfigError("USERS_TLS_CLIENT_CA_FILE (mTLS) needs USERS_TLS_CERT_FILE and USERS_TLS_KEY_FILE")
        return settings


class _Reader:
    """Looks variables up and turns parse failures into errors naming the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        # Every name looked up, set or not: the names a USERS_* variable may have.
        self.read: set[str] = set()

    def get(self, name: str, default: _T, parse: Callable[[str], _T], *, secret: bool = False) -> _T:
        self.read.add(name)
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as error:
            # A secret's value stays out of the message, which ends up in logs.
            raise ConfigError(f"{name}{'' if secret else f'={raw!r}'}: {error}") from None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        return self.get(name, default, _whole_number(name, default, low, high))

    def optional_integer(self, name: str, example: int, low: int, high: int) -> int | None:
        """A whole number, or None when unset (the setting then follows another)."""
        return self.get(name, None, _whole_number(name, example, low, high))

    def number(self, name: str, default: float, low: float, high: float) -> float:
        return self.get(
            name, default, lambda raw: _in_range(_parsed(float, raw, f"a number{_unit(name)}", default), low, high)
        )


def _whole_number(name: str, example: int, low: int, high: int) -> Callable[[str], int]:
    """The parser of a whole-number setting from ``low`` to ``high``; ``example`` shows in its refusal."""
    return lambda raw: _in_range(_parsed(int, raw, f"a whole number{_unit(name)}", example), low, high)


def _unknown_variables(environ: Mapping[str, str], known: set[str]) -> tuple[UnknownVariable, ...]:
    unknown = sorted(name for name in environ if name.startswith("USERS_") and name not in known)
    return tuple(
        UnknownVariable(name, next(iter(difflib.get_close_matches(name, known, n=1)), None)) for name in unknown
    )


def _unit(name: str) -> str:
    for suffix, unit in (("_SECONDS", " of seconds"), ("_DAYS", " of days")):
        if name.endswith(suffix):
            return unit
    return ""


def _parsed(kind: Callable[[str], _N], raw: str, what: str, example: _N) -> _N:
    """``kind(raw)``, or an error saying what is expected instead of Python's own message
    ("invalid literal for int() with base 10: '15m'")."""
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"must be {what}, such as {example}") from None


_N = TypeVar("_N", int, float)


def _in_range(value: _N, low: _N, high: _N) -> _N:
    if not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _host_port(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port, such as 127.0.0.1:50051 or [::]:50051")
    return raw


def listen_address(raw: str) -> str:
    """An address as USERS_GRPC_ADDRESS takes it, for a command-line flag that sets one."""
    return _host_port(raw.strip())


def _mongodb_uri(raw: str) -> str:
    if not raw.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError("must start with mongodb:// or mongodb+srv://")
    return raw


def _database_name(raw: str) -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    if len(raw) > 63 or not set(raw) <= allowed:
        raise ValueError("must be 1 to 63 letters, digits, '_' or '-'")
    return raw


_SMTP_SECURITY: dict[str, SmtpSecurity] = {"starttls": "starttls", "tls": "tls", "none": "none"}


def _smtp_security(raw: str) -> SmtpSecurity:
    try:
        return _SMTP_SECURITY[raw.lower()]
    except KeyError:
        raise ValueError("must be starttls, tls or none") from None


def _mail_from(raw: str) -> Address:
    """One address, optionally with a display name, parsed by the standard library."""
    usage = "must be one address, such as 'Accounts <no-reply@example.com>'"
    if any(not char.isprintable() for char in raw):
        raise ValueError(f"{usage}, without control characters")
    header = email.policy.default.header_factory("From", raw)
    # The registry's header class derives from both; typeshed cannot say so.
    assert isinstance(header, AddressHeader)
    if cast(BaseHeader, header).defects or len(header.groups) != 1 or header.groups[0].display_name is not None:
        raise ValueError(usage)
    [address] = header.groups[0].addresses
    if not address.username or not address.domain or not address.addr_spec.isascii():
        raise ValueError(f"{usage}, with an ASCII user@domain")
    if address.domain.startswith("["):
        raise ValueError(f"{usage}, with a domain name")
    return Address(display_name=address.display_name, username=address.username, domain=address.domain)


def _log_level(raw: str) -> str:
    upper = raw.upper()
    if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return upper


def _key_encryption_key(raw: str) -> bytes:
    try:
        key = base64url.decode(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError("must be 32 random bytes in base64; make one with `users-grpc keys new-kek`")
    return key


def _old_key_encryption_keys(raw: str) -> tuple[bytes, ...]:
    keys = []
    for position, entry in enumerate(raw.split(","), start=1):
        try:
            keys.append(_key_encryption_key(entry.strip()))
        except ValueError:
            # The value is a secret: name the entry, never echo it.
            raise ValueError(f"entry {position} is not 32 random bytes in base64 (a comma-separated list)") from None
    return tuple(keys)


def _names(raw: str) -> frozenset[str]:
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def _rp_id(raw: str) -> str:
    # A registrable domain (or localhost), without scheme or port: what WebAuthn hashes into every assertion.
    if "://" in raw or "/" in raw or ":" in raw or not raw.isascii():
        raise ValueError("must be a domain name such as example.com (no scheme, port or path; IDNA A-labels)")
    return raw.lower()


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(origin.strip().rstrip("/") for origin in raw.split(",") if origin.strip())
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if scheme not in {"https", "http"} or not rest or "/" in rest:
            raise ValueError("must be origins such as https://example.com, comma-separated (scheme, host, port)")
    return origins


def _networks(raw: str) -> tuple[str, ...]:
    networks = tuple(part.strip() for part in raw.split(",") if part.strip())
    for network in networks:
        ipaddress.ip_network(network)  # ValueError: not an address, nor a network without host bits
    return networks


def _existing_directory(raw: str) -> Path:
    path = Path(raw)
    if not path.is_dir():
        raise ValueError("must be an existing directory")
    return path


def _language(raw: str) -> str:
    if not (2 <= len(raw) <= 8 and raw.isascii() and raw.isalpha()):
        raise ValueError("must be a language code of letters, such as en or de")
    return raw.lower()


def _link_url(raw: str) -> str:
    """A front end's page: https, or http on this machine (development); the token goes in its
    fragment, so it may carry none of its own."""
    parts = urllib.parse.urlsplit(raw)
    local = parts.scheme == "http" and parts.hostname in {"localhost", "127.0.0.1", "::1"}
    if not (parts.scheme == "https" and parts.hostname) and not local:
        raise ValueError("must be an https:// URL (or http://localhost for development)")
    if parts.fragment or "#" in raw or any(not char.isprintable() or char.isspace() for char in raw):
        raise ValueError("must be a URL without a fragment (#) or spaces: the token goes in its fragment")
    return raw


def _range_url(raw: str) -> str:
    """A Have I Been Pwned style range API: the five hex digits of a SHA-1 prefix are appended."""
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in {"https", "http"} or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            "must be an http(s):// URL without query or fragment, such as https://api.pwnedpasswords.com/range/"
        )
    return raw


def _existing_file(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise ValueError("no such file")
    return path
