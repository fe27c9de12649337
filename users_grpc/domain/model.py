"""Domain types and rules of user accounts.

Nothing here knows about gRPC or MongoDB: ``grpc_api/convert.py`` converts protobuf
messages into these types, and ``adapters/mongo/`` converts them to BSON.

Past 500 lines, and one module on purpose: these are plain value types (most a frozen dataclass
of a few fields) that every layer above imports; split by area they would import each other
(an account, an access claim, a caller and a change record all name :class:`User` or :class:`Role`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from users_grpc.domain import base64url
from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.metadata import MetadataEntry, MetadataFilter, MetadataKey


class Role(enum.Enum):
    USER = "user"
    ADMIN = "admin"


class UserState(enum.Enum):
    PENDING_ACTIVATION = "pending_activation"
    ACTIVE = "active"
    DEACTIVATED = "deactivated"
    LOCKED = "locked"


class Gender(enum.Enum):
    UNSPECIFIED = "unspecified"
    MALE = "male"
    FEMALE = "female"
    OTHER = "other"


class PasswordScheme(enum.Enum):
    """How a stored password hash was made, so the hasher checks it the right way."""

    # Ours (users_grpc.adapters.bcrypt_hasher.BcryptHasher): bcrypt over base64(HMAC-SHA384(pepper, password)).
    PEPPERED = "bcrypt-hmac-sha384"
    # Imported from another system: plain bcrypt over the UTF-8 password. Replaced by ours at the
    # first successful sign-in.
    BCRYPT = "bcrypt"
    # Imported without a hash: no password matches; the person sets one with ForgotPassword.
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class User:
    """An account as callers may see it: no secrets."""

    id: str
    username: str
    first_name: str
    last_name: str
    email: str
    gender: Gender
    role: Role
    state: UserState
    created_at: datetime
    updated_at: datetime
    # Bumped whenever earlier access tokens must stop working (RevokeAllSessions, and later
    # password, role and MFA changes); tokens carry the version they were issued under.
    token_version: int = 0
    mfa_enabled: bool = False
    # Bumped by every UpdateUser, so that two updates within one millisecond still differ in etag.
    revision: int = 0
    # The BCP 47 tag of the user's mails; "" for the server's default.
    language_code: str = ""
    # Both scopes, by scope then key: only an admin's or a machine caller's view shows them.
    metadata: tuple[MetadataEntry, ...] = dataclasses.field(default=(), repr=False)
    # Set by an admin (SetPassword, ImportUsers): the next sign-in must change the password first.
    password_change_required: bool = False
    # When the password was last set; None if set before this was stored (see password_age_start).
    password_changed_at: datetime | None = None

    @property
    def password_age_start(self) -> datetime:
        """Where the password's age counts from: a password set before its time was stored counts
        from the account's creation, the earliest it can have been set (so never expires late)."""
        return self.password_changed_at or self.created_at

    # Another system's identifier for the account (a SCIM externalId); "" for none. Not unique.
    external_id: str = ""

    @property
    def etag(self) -> str:
        """Opaque to callers: the revision and the stored updated_at (milliseconds), which together
        change with every change of the user; :func:`parse_etag` reads them back."""
        return _etag(self.revision, self.updated_at)

    @property
    def is_active(self) -> bool:
        """Only an active account signs in, refreshes, resets its password or is found by identifier."""
        return self.state is UserState.ACTIVE

    @property
    def is_active_admin(self) -> bool:
        return self.role is Role.ADMIN and self.is_active


@dataclass(frozen=True, kw_only=True)
class ActivationCode:
    """The pending activation of an inactive account.

    ``sends_in_window`` counts the codes mailed since ``window_started_at``, to
    cap resends per account.
    """

    digest: str
    expires_at: datetime
    attempts_left: int
    sends_in_window: int
    window_started_at: datetime
    # The long token mailed with an activation code. It cannot be guessed, so it has no attempt
    # cap and a stranger's wrong guesses never use it up. Empty where none was issued.
    token_digest: str = ""
    token_expires_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class PendingEmailChange:
    """A change of address the user asked for, waiting for the code mailed to ``new_email``.

    ``code`` follows the activation rules (keyed digest, expiry, attempt and send caps); its
    digest binds ``new_email`` too, so a code mailed for one address confirms no other.
    """

    new_email: str
    code: ActivationCode


@dataclass(frozen=True, kw_only=True)
class Tally:
    """A throttle's count of events (failed tries, or a source's sign-ins) and when the last one was.

    Of the tries counted as failed, ``pending`` are still being compared; they settle by ``settles_by``.
    """

    count: int
    last_at: datetime
    pending: int = 0
    settles_by: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class Mfa:
    """A user's TOTP enrollment: pending until confirmed with a code, then active."""

    active: bool
    sealed_secret: bytes
    # The newest 30-second step whose code was accepted; older and equal steps are refused.
    last_used_step: int
    recovery_digests: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Account:
    """A user together with the secrets only the services may see."""

    user: User
    password_hash: str
    activation: ActivationCode | None
    password_reset: ActivationCode | None = None
    mfa: Mfa | None = None
    password_scheme: PasswordScheme = PasswordScheme.PEPPERED
    # Hashes of the last passwords (the current one last), at most USERS_PASSWORD_HISTORY.
    password_history: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PasswordHistory:
    """The password hashes kept after a change (the new one last), and the hash it replaces: the
    change applies only while that is still the password, so a change made meanwhile is never
    dropped from the history (FerretDB ignores $push's $slice: the trimmed list is $set whole)."""

    hashes: tuple[str, ...]
    replaces: str


@dataclass(frozen=True, kw_only=True)
class NewUser:
    """A validated registration, ready to store."""

    # Chosen before the user is stored, so that the activation code's digest is bound to it.
    id: str
    username: str
    first_name: str
    last_name: str
    email: str
    gender: Gender
    role: Role
    password_hash: str
    is_active: bool
    # None for accounts created active, such as admins made with the CLI.
    activation: ActivationCode | None
    created_at: datetime
    password_scheme: PasswordScheme = PasswordScheme.PEPPERED
    # Imported users are never purged as "never activated": they were accounts elsewhere.
    imported: bool = False
    language_code: str = ""
    password_change_required: bool = False
    external_id: str = ""


@dataclass(frozen=True, kw_only=True)
class ImportedUser:
    """A user from another system, as an admin imports it; not yet validated."""

    username: str
    first_name: str
    last_name: str
    email: str
    gender: Gender
    role: Role
    email_verified: bool
    # The old system's bcrypt hash, or "" for none.
    password_hash: str
    # The first sign-in must change the password (the hash was never checked by our rules).
    password_change_required: bool = False
    external_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Registration:
    """What a caller asks for when creating a user, not yet validated."""

    username: str
    first_name: str
    last_name: str
    email: str
    password: str
    password_confirmation: str
    gender: Gender
    role: Role
    language_code: str = ""


@dataclass(frozen=True, kw_only=True)
class Mail:
    to: str
    subject: str
    body: str
    # The HTML alternative of ``body``, rendered from an autoescaped template; None for a plain
    # text mail (every mail queued before mails had templates).
    html: str | None = None


@dataclass(frozen=True, kw_only=True)
class Notice:
    """A security notice written into the user's document by the same update as the change it
    tells of, so neither exists without the other; the mail sender moves it to the outbox."""

    id: str
    mail: Mail


@dataclass(frozen=True, kw_only=True)
class PendingNotices:
    """One user's notices, claimed (for a lease) by one sender to move them to the outbox."""

    user_id: str
    claim: str
    notices: tuple[Notice, ...]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_milliseconds(moment: datetime) -> datetime:
    """``moment`` cut to the millisecond: the precision every stored time has (BSON dates), so a
    time kept in memory, compared or named in a token equals the one read back later."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _etag(revision: int, updated_at: datetime) -> str:
    if updated_at.tzinfo is None:  # BSON dates are UTC; a client without tz_aware reads them naive
        updated_at = updated_at.replace(tzinfo=UTC)
    raw = f"{revision}:{(updated_at - _EPOCH) // timedelta(milliseconds=1)}"
    return base64url.encode(raw.encode())


_MAX_REVISION = 2**63 - 1


@dataclass(frozen=True)
class Version:
    """What an etag says of the user it was read from."""

    revision: int
    updated_at: datetime


def parse_etag(etag: str) -> Version:
    try:
        revision, _, millis = base64url.decode(etag).decode().partition(":")
        version = Version(int(revision), _EPOCH + timedelta(milliseconds=int(millis)))
    except (ValueError, OverflowError):  # UnicodeDecodeError is a ValueError
        raise InvalidArgument([FieldViolation("etag", "is not an etag of a user")]) from None
    # Only the one spelling we make: anything else was not read from a user. A revision is a
    # BSON 8-byte integer: a larger one was never read from a user and cannot be queried.
    if not 0 <= version.revision <= _MAX_REVISION or _etag(version.revision, version.updated_at) != etag:
        raise InvalidArgument([FieldViolation("etag", "is not an etag of a user")])
    return version


@dataclass(frozen=True, kw_only=True)
class UserFilter:
    """Which users ListUsers shows; None (or "") means any."""

    role: Role | None = None
    state: UserState | None = None
    mfa_enabled: bool | None = None
    # The identifier_key of the prefix of a username or an email.
    prefix_key: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    metadata: MetadataFilter | None = None
    external_id: str = ""

    def fingerprint(self) -> bytes:
        """Equal exactly for equal filters, so that a page token is bound to its filters."""
        parts = (
            self.role and self.role.value,
            self.state and self.state.value,
            self.mfa_enabled,
            self.prefix_key,
            self.created_after and self.created_after.isoformat(),
            self.created_before and self.created_before.isoformat(),
            *(() if self.metadata is None else (self.metadata.scope.value, self.metadata.key, self.metadata.value)),
            *((self.external_id,) if self.external_id else ()),
        )
        return repr(parts).encode()


# Paths of User that UpdateUser may change.
UPDATABLE_FIELDS = ("first_name", "last_name", "gender", "username", "language_code", "external_id")


@dataclass(frozen=True, kw_only=True)
class ProfileChanges:
    """UpdateUser's new values, only of the fields it changes; validated by
    :func:`validate_profile_changes`."""

    first_name: str | None = None
    last_name: str | None = None
    gender: Gender | None = None
    username: str | None = None
    language_code: str | None = None
    # "" clears it.
    external_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class QueuedMail:
    """A mail in the outbox, claimed by one sender for one delivery attempt."""

    id: str
    mail: Mail
    attempts: int
    # The user whose security notice this is a copy of; None for any other mail.
    notice_of: str | None = None


@dataclass(frozen=True, kw_only=True)
class Session:
    """One sign-in: the family of refresh tokens that rotate from one authentication."""

    id: str
    user_id: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    # The user's token version at sign-in: a later bump ends the session even if it was
    # opened while the change that bumped it was under way.
    token_version: int = 0


@dataclass(frozen=True, kw_only=True)
class AccessClaims:
    """What a verified access token says."""

    subject: str
    role: Role
    token_version: int
    session_id: str
    token_id: str
    issuer: str
    audience: str
    issued_at: datetime
    expires_at: datetime
    # The ids of the groups the user was in when the token was issued (the ``groups`` claim).
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class IssuedTokens:
    access_token: str
    access_token_expires_at: datetime
    refresh_token: str
    session: Session


@dataclass(frozen=True, kw_only=True)
class StoredKey:
    """A signing key as kept in the key store: the private half sealed (encrypted)."""

    kid: str
    sealed_private_key: bytes
    created_at: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class ServiceAccount:
    """A machine caller's credential; its secret is never kept, only a keyed digest of it."""

    client_id: str
    name: str
    created_at: datetime
    permissions: frozenset[ServiceAccountPermission] = frozenset()


class ServiceAccountPermission(enum.Enum):
    """What a service account's tokens may do besides a machine caller's (access.py's rules)."""

    PROVISION_USERS = "provision_users"


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Who is calling: a user (by access token) or an internal service (by mTLS identity).

    ``source`` is the address the call comes from: the peer's IP, or, for a machine caller
    that signs users in on their behalf, the end user's address it passes in
    ``x-forwarded-for``. Throttles and security logs key on it.
    """

    user_id: str | None = None
    role: Role | None = None
    machine: str | None = None
    session_id: str | None = None
    source: str = ""
    # The client id of a service account whose token the machine caller presented.
    service_account_id: str | None = None
    # Signed in by a password-change token (PasswordChangeRequired): admitted to ChangePassword only.
    password_change_only: bool = False
    # The caller's own account as read to check their token, during this call only: a call about
    # themself answers from it rather than reading the same document again. Per call, never
    # cached across calls, so every replica sees each change as soon as it is stored.
    user: User | None = dataclasses.field(default=None, repr=False, compare=False)
    # A service account's, as stored: read again at every call, so a deleted account grants nothing.
    permissions: frozenset[ServiceAccountPermission] = frozenset()

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def is_provisioner(self) -> bool:
        return ServiceAccountPermission.PROVISION_USERS in self.permissions


ANONYMOUS = Caller()


class AuditEventType(enum.Enum):
    """What an audit event records; the value is what the database stores, so never change one."""

    SIGN_IN = "sign_in"
    CREDENTIALS_CHECK = "credentials_check"
    SERVICE_TOKEN_ISSUE = "service_token_issue"  # noqa: S105  # an event name
    PASSWORD_CHANGE = "password_change"  # noqa: S105  # an event name
    PASSWORD_RESET = "password_reset"  # noqa: S105  # an event name
    MFA_ENROLL = "mfa_enroll"
    MFA_ENABLE = "mfa_enable"
    MFA_DISABLE = "mfa_disable"
    MFA_RESET = "mfa_reset"
    RECOVERY_CODES_REGENERATE = "recovery_codes_regenerate"
    EMAIL_CHANGE_REQUEST = "email_change_request"
    EMAIL_CHANGE_CONFIRM = "email_change_confirm"
    EMAIL_SET = "email_set"
    ROLE_CHANGE = "role_change"
    USER_DEACTIVATE = "user_deactivate"
    USER_REACTIVATE = "user_reactivate"
    USER_LOCK = "user_lock"
    USER_UNLOCK = "user_unlock"
    USER_DELETE = "user_delete"
    USERS_IMPORT = "users_import"
    SERVICE_ACCOUNT_CREATE = "service_account_create"
    SERVICE_ACCOUNT_DELETE = "service_account_delete"
    SESSIONS_REVOKE = "sessions_revoke"
    PROFILE_UPDATE = "profile_update"
    METADATA_SET = "metadata_set"
    METADATA_DELETE = "metadata_delete"
    GROUP_CREATE = "group_create"
    GROUP_RENAME = "group_rename"
    GROUP_DELETE = "group_delete"
    GROUP_MEMBER_ADD = "group_member_add"
    GROUP_MEMBER_REMOVE = "group_member_remove"
    PASSKEY_REGISTRATION_START = "passkey_registration_start"
    PASSKEY_REGISTER = "passkey_register"
    PASSKEY_SIGN_IN = "passkey_sign_in"
    PASSKEY_RENAME = "passkey_rename"
    PASSKEY_REMOVE = "passkey_remove"
    PASSWORD_SET = "password_set"  # noqa: S105  # an event name
    SERVICE_ACCOUNT_TOKEN_CREATE = "service_account_token_create"  # noqa: S105  # an event name
    SERVICE_ACCOUNT_TOKEN_REVOKE = "service_account_token_revoke"  # noqa: S105  # an event name


class ActorKind(enum.Enum):
    ANONYMOUS = "anonymous"
    USER = "user"
    MACHINE = "machine"
    SERVICE_ACCOUNT = "service_account"
    OPERATOR = "operator"  # a command on a host, such as create-admin


@dataclass(frozen=True, kw_only=True)
class AuditActor:
    kind: ActorKind
    id: str  # "" for an anonymous actor
    source: str


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One security event: never a password, code, token, hash or secret.

    ``status_code`` is the gRPC status number the caller got (0 on success) and ``error_reason``
    its ``google.rpc.ErrorInfo`` reason; ``reason`` is a short note of the service's own making.
    """

    type: AuditEventType
    time: datetime
    actor: AuditActor
    subject_id: str
    status_code: int
    error_reason: str = ""
    reason: str = ""
    id: str = ""  # assigned when stored


@dataclass(frozen=True, kw_only=True)
class AuditFilter:
    subject_id: str = ""
    actor_id: str = ""
    types: frozenset[AuditEventType] = frozenset()
    start_time: datetime | None = None
    end_time: datetime | None = None

    def fingerprint(self) -> bytes:
        """Equal exactly for equal filters, so that a page token is bound to its filters."""
        parts = (
            self.subject_id,
            self.actor_id,
            sorted(t.value for t in self.types),
            self.start_time and self.start_time.isoformat(),
            self.end_time and self.end_time.isoformat(),
        )
        return repr(parts).encode()


@dataclass(frozen=True)
class AuditPosition:
    """Where a page of the audit trail ends: events older than this (by time, then id) come next."""

    time: datetime
    id: str


class ChangeType(enum.Enum):
    """What a change of the change feed (WatchUserChanges) did to a user."""

    CREATED = "created"
    ACTIVATED = "activated"
    UPDATED = "updated"
    EMAIL_CHANGED = "email_changed"
    ROLE_CHANGED = "role_changed"
    DEACTIVATED = "deactivated"
    REACTIVATED = "reactivated"
    LOCKED = "locked"
    UNLOCKED = "unlocked"
    DELETED = "deleted"
    METADATA_CHANGED = "metadata_changed"
    GROUP_MEMBER_ADDED = "group_member_added"
    GROUP_MEMBER_REMOVED = "group_member_removed"
    PASSKEY_ADDED = "passkey_added"
    PASSKEY_REMOVED = "passkey_removed"
    PASSKEY_USED = "passkey_used"


@dataclass(frozen=True, kw_only=True)
class UserChange:
    """One change of the feed: ``sequence`` is its place in the one global order (dense: 1, 2, 3, ...),
    ``number`` its place among the changes of its user (1, 2, 3, ...)."""

    sequence: int
    user_id: str
    number: int
    type: ChangeType
    changed_at: datetime
    # The user as stored when the change was published (None for a deletion): after this change,
    # and possibly after later changes of the same user too, whose own changes follow this one.
    user: User | None
    # For METADATA_CHANGED: the entries set or removed.
    metadata_keys: tuple[MetadataKey, ...] = ()
    # The group a membership change is about; "" for every other change.
    group_id: str = ""
