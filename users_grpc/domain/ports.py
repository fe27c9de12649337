"""The small interfaces the services depend on.

Real adapters live in :mod:`users_grpc.adapters.mongo`, :mod:`users_grpc.adapters.bcrypt_hasher`
and :mod:`users_grpc.services.mail`; fakes for unit tests live in ``tests/support/fakes.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Literal, Protocol

from users_grpc.domain.metadata import MetadataEntry, MetadataKey, StoredMetadata
from users_grpc.domain.model import (
    Account,
    ActivationCode,
    AuditEvent,
    AuditFilter,
    AuditPosition,
    Mail,
    NewUser,
    PasswordHistory,
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
)
from users_grpc.domain.passkeys import (
    AllowedCredential,
    AssertionClaim,
    Ceremony,
    CeremonyPurpose,
    NewCredential,
    PasskeyHolder,
    Removal,
    StoredPasskey,
    VerifiedAssertion,
)
from users_grpc.domain.service_account_tokens import ServiceAccountToken, TokenHolder


class UserRepository(Protocol):
    def new_id(self) -> str:
        """A fresh user id, so that secrets can be bound to the user before it is stored."""

    async def add(self, new_user: NewUser) -> User:
        """Store a new user under ``new_user.id``; raise ``AlreadyExists`` naming a taken username or email."""

    async def get(self, user_id: str) -> User | None: ...

    async def get_account(self, user_id: str) -> Account | None: ...

    async def find_account(self, identifier_key: str) -> Account | None:
        """The account whose username or email has this :func:`~users_grpc.domain.rules.identifier_key`."""

    async def reserve_activation_attempt(self, user_id: str, now: datetime) -> ActivationCode | None:
        """Use up one attempt of the user's unexpired pending code and return the code;
        None if there is none, or it has expired or has no attempts left."""

    async def activate(self, user_id: str, code_digest: str, now: datetime) -> User | None:
        """Activate the user if this unexpired code is still pending; else None. Works once."""

    async def activate_with_token(self, user_id: str, token_digest: str, now: datetime) -> User | None:
        """Activate the user if this unexpired activation token is still pending; else None. Works once."""

    async def replace_activation_code(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        """Pend a new code for an inactive user unless the send cap is reached; True if pended."""

    async def delete(self, user_id: str) -> bool:
        """Delete the user; False if there was none."""

    async def delete_by_identifier(self, identifier_key: str) -> bool: ...

    async def bump_token_version(self, user_id: str, now: datetime) -> None:
        """Make every access token issued to the user so far invalid, and any pending password-reset token."""

    async def change_state(
        self, user_id: str, *, from_states: frozenset[UserState], to: UserState, now: datetime
    ) -> User | None:
        """Move the user from one of ``from_states`` to ``to`` in one conditional update (the token
        version unchanged); the user as it was before, or None if it was in none of them."""

    async def set_role(self, user_id: str, role: Role, now: datetime) -> User | None:
        """Give the user ``role`` in one conditional update (the token version unchanged); the user as
        it was before, or None if there is no such user or they had the role already."""

    async def count_active_admins(self) -> int: ...

    async def take_admin_check(self, holder: str, lease_seconds: float) -> bool:
        """Hold the check of active admins after a removal (one holder at a time, across replicas)
        for ``lease_seconds`` or until released; False while another holder's lease runs."""

    async def release_admin_check(self, holder: str) -> None: ...

    async def delete_unless_active_admin(self, user_id: str) -> bool:
        """Delete the user unless they are an active admin, in one operation; True if deleted."""

    async def upgrade_password_hash(self, user_id: str, old_hash: str, new_hash: str) -> bool:
        """Replace an imported hash by one of our scheme, if the stored hash is still ``old_hash``
        (a password changed meanwhile wins); True if replaced."""


class UserDirectory(Protocol):
    """Listing users and changing their profiles (ListUsers, UpdateUser)."""

    async def get(self, user_id: str) -> User | None: ...

    async def list_users(self, filters: UserFilter, after_id: str | None, limit: int) -> list[User]:
        """Up to ``limit`` users matching ``filters`` whose id is greater than ``after_id``, by id."""

    async def count_users(self, filters: UserFilter) -> int: ...

    async def update_profile(
        self, user_id: str, changes: ProfileChanges, expected: Version | None, now: datetime
    ) -> User | None:
        """Apply ``changes`` in one update, if the user is still at ``expected`` (when given); the user
        after it, or None if no user matched. A taken username raises ``AlreadyExists("username")``."""


class CredentialRepository(Protocol):
    """Password resets and second factors; each change is one conditional update.

    A change the user must be told of takes its ``notice``, pended in that same update
    (see :class:`NoticeStore`): a change never lands without its notice, nor a notice without it.
    """

    async def get_account(self, user_id: str) -> Account | None: ...

    async def find_account(self, identifier_key: str) -> Account | None: ...

    async def replace_password_reset(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool: ...

    async def find_account_by_reset_digest(self, user_id: str, digest: str, now: datetime) -> Account | None: ...

    async def reset_password(
        self,
        user_id: str,
        digest: str,
        password_hash: str,
        now: datetime,
        notice: Mail,
        *,
        history: PasswordHistory | None = None,
    ) -> bool: ...

    async def set_password(
        self,
        user_id: str,
        password_hash: str,
        now: datetime,
        notice: Mail,
        *,
        history: PasswordHistory | None = None,
        change_required: bool = False,
    ) -> bool:
        """Set a new password, with its notice; ``change_required`` as an admin asks (SetPassword);
        ``history`` (when given) applies only while the password is still the one it replaces."""

    async def start_mfa_enrollment(self, user_id: str, sealed_secret: bytes, now: datetime) -> bool: ...

    async def confirm_mfa(
        self, user_id: str, step: int, recovery_digests: list[str], now: datetime, notice: Mail
    ) -> bool: ...

    async def use_totp_step(self, user_id: str, step: int) -> bool: ...

    async def use_recovery_code(self, user_id: str, digest: str) -> bool: ...

    async def replace_recovery_codes(self, user_id: str, digests: list[str]) -> bool: ...

    async def disable_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool: ...

    async def reset_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        """Remove any enrollment, active or pending, with its notice; False if there was none."""

    async def reserve_mfa_attempt(
        self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int
    ) -> bool: ...


class EmailChangeRepository(Protocol):
    """Changes of a user's email. The swap is one conditional update, its uniqueness resting
    on the unique ``email_key`` index: a taken address raises ``AlreadyExists("email")``."""

    async def get_account(self, user_id: str) -> Account | None: ...

    async def pend_email_change(
        self,
        user_id: str,
        change: PendingEmailChange,
        *,
        max_sends: int,
        window_seconds: int,
        notice: Mail | None = None,
    ) -> bool:
        """Pend ``change`` for an active user, replacing any older one, unless the sends in the
        window hit the cap; True if pended. ``notice`` is pended in the same update."""

    async def reserve_email_change_attempt(self, user_id: str, now: datetime) -> PendingEmailChange | None:
        """Use up one attempt of the user's unexpired pending change and return it; None if there
        is none, or it has expired or has no attempts left."""

    async def confirm_email_change(
        self, user_id: str, new_email: str, code_digest: str, now: datetime, notice: Mail | None = None
    ) -> tuple[User, User] | None:
        """Set the pending ``new_email`` if this unexpired code is still pending, in one conditional
        update; the user (before, after), or None. Works once. With a ``notice``, pended in the same
        update, which then applies only while ``notice.to`` is still the user's email."""

    async def set_email(
        self, user_id: str, email: str, now: datetime, notice: Mail | None = None
    ) -> tuple[User, User] | None:
        """Set the email at once, dropping any pending change; the user (before, after), or None.
        ``notice`` as in :meth:`confirm_email_change`."""


class SessionRepository(Protocol):
    """Sessions, each holding its refresh-token generation and the digest of its current token:
    constant space however often it is refreshed."""

    def new_id(self) -> str:
        """A fresh session id, so that its first refresh token can name it before it is stored."""

    async def create(
        self,
        session_id: str,
        user_id: str,
        token_digest: str,
        now: datetime,
        expires_at: datetime,
        token_version: int,
    ) -> Session:
        """Store a session at generation 0 with this token digest."""

    async def rotate(
        self, session_id: str, generation: int, token_digest: str, new_token_digest: str, now: datetime
    ) -> Session | None:
        """Move a live session from ``generation`` (whose current token has ``token_digest``) to the
        next, with ``new_token_digest``, in one conditional update; None unless all of it held."""

    async def revoke_replayed(self, session_id: str, generation: int, now: datetime) -> Session | None:
        """Revoke the session if it has moved past ``generation`` (a used-up token came back); the session revoked."""

    async def revoke(self, session_id: str, now: datetime) -> None: ...

    async def list_active(self, user_id: str, now: datetime) -> list[Session]: ...

    async def revoke_all(self, user_id: str, now: datetime) -> None: ...


class ThrottleStore(Protocol):
    """Tallies shared by every replica: failed tries, sources an account signed in from, request counts."""

    async def get(self, keys: list[str]) -> dict[str, Tally]: ...

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
        """Count a try as failed, and in flight until it settles (by ``settles_by`` at the latest).

        A fresh tally if none was ``seen`` or the one seen is older than ``window``; else one more
        if the tally still holds fewer than ``below``, or is still as ``seen``. False if not
        counted: the tally changed since it was seen (another try counted first, or it was forgotten).
        """

    async def settle_failure(self, key: str, now: datetime) -> None:
        """A try counted on the tally compared and failed at ``now``: it stays counted, no longer in
        flight, and the delays after it run from ``now``."""

    async def uncount_failure(self, key: str) -> None:
        """Take back a try in flight (one that never reached a comparison, or the owner's success)."""

    async def forget(self, key: str) -> None: ...

    async def remember(self, key: str, account: str, now: datetime, expires_at: datetime) -> None:
        """Record an event that needs no counting, such as a sign-in from a source."""

    async def forget_account(self, account: str) -> None:
        """Forget every failure counted against the account (not the sources it signed in from)."""

    async def hit(self, key: str, expires_at: datetime) -> int:
        """Count one request under ``key``; the count so far, this one included."""


class KeyStore(Protocol):
    """Where signing keys live, shared by every replica."""

    async def add(self, key: StoredKey) -> None: ...

    async def all(self) -> list[StoredKey]: ...

    async def retire(self, kid: str, now: datetime) -> bool: ...


class Mailer(Protocol):
    async def send(self, mail: Mail) -> None:
        """Accept ``mail`` for delivery: durably queued when this returns, delivered later."""

    def wake(self) -> None:
        """Deliver soon: a notice was pended in a user's document (it goes out anyway, a poll later)."""


MailKind = Literal["activation", "password-reset", "email-change-code", "notice"]
# The security notices (MailKind "notice"): the service names one in the value `notice`, and the
# templates hold its words in every language (the passkey ones also take `passkey_name`).
NoticeKind = Literal[
    "password-reset",
    "password-changed",
    "password-set",
    "mfa-enabled",
    "mfa-disabled",
    "mfa-reset",
    "email-change-requested",
    "email-changed",
    "email-set",
    "passkey-added",
    "passkey-removed",
    "passkey-removed-by-admin",
    "passkey-counter-regressed",
]


class MailRenderer(Protocol):
    """Mails from templates: the services name the kind and pass plain values (a username, a
    code, a token, minutes); the renderer escapes them, adds the operator's link, picks the
    language and never lets a value be read as template syntax."""

    def render(self, kind: MailKind, *, to: str, values: Mapping[str, str | int], language: str | None = None) -> Mail:
        """The mail of ``kind`` to ``to``; ``language`` None (or one without templates): the default one."""


# Each purpose has its own key: a digest made for one never matches in another.
DigestPurpose = Literal[
    "activation-code",
    "activation-token",
    "recovery-code",
    "password-reset",
    "refresh-token",
    "refresh-token-tag",
    "email-change-code",
    "service-account-secret",
    "passkey-decoy",
    "service-account-token",
]


class SecretDigests(Protocol):
    """Keyed digests of codes and tokens, so the database never holds one in a usable form.

    The key stays behind this port (:class:`users_grpc.adapters.secrets_at_rest.SecretsAtRest`): without
    it, a copy of the database gives no way to test a guess, even of a 6-digit code.
    """

    def digest(self, purpose: DigestPurpose, subject: str, secret: str) -> str:
        """HMAC-SHA256 of ``secret`` under the purpose's key, bound to ``subject`` (a user or session id).

        Keyed by the current digest root and naming it: what to store."""

    def digests(self, purpose: DigestPurpose, subject: str, secret: str) -> list[str]:
        """The digest under each digest root, the current one first: to look a stored one up by."""

    def matches(self, stored: str, purpose: DigestPurpose, subject: str, secret: str) -> bool:
        """Whether ``stored`` (read from the database) is the digest of ``secret``, under its own root."""


class PasswordHasher(Protocol):
    async def hash(self, password: str) -> str: ...

    async def verify(
        self, password: str, password_hash: str | None, scheme: PasswordScheme = PasswordScheme.PEPPERED
    ) -> bool:
        """True if ``password`` matches the hash, made under ``scheme``. ``None`` (and the scheme
        NONE) does the same work and returns False, so a missing account takes as long as a wrong
        password."""


class BreachCheckFailed(Exception):
    """The breached-password source gave no usable answer (down, slow, or answering nonsense)."""


class BreachedPasswords(Protocol):
    """A corpus of passwords exposed in breaches (adapters/breached_passwords.py: a range API)."""

    async def is_breached(self, password: str) -> bool:
        """Whether the corpus holds ``password``; :class:`BreachCheckFailed` if it cannot tell."""


class ServiceAccountRepository(Protocol):
    """Service accounts: a name and a keyed digest of the secret, by client id."""

    def new_id(self) -> str: ...

    async def add(self, account: ServiceAccount, secret_digest: str) -> None:
        """Store the account; raise ``AlreadyExists("name")`` if the name is taken."""

    async def secret_digest(self, client_id: str) -> str | None:
        """The digest of the account's secret; None if there is no such account."""

    async def get(self, client_id: str) -> ServiceAccount | None: ...

    async def list_after(self, client_id: str | None, limit: int) -> list[ServiceAccount]:
        """Up to ``limit`` accounts in client-id order (oldest first), after ``client_id`` if given."""

    async def delete(self, client_id: str) -> bool: ...


class ServiceAccountTokenRepository(Protocol):
    """The tokens of service accounts, kept inside each account (adapters/mongo/service_accounts.py)."""

    def new_id(self) -> str: ...

    async def add_token(self, token: ServiceAccountToken, digest: str, limit: int) -> bool:
        """Store the token in its account; False if there is no such account or it holds ``limit`` tokens."""

    async def get(self, client_id: str) -> ServiceAccount | None: ...

    async def tokens(self, client_id: str) -> list[ServiceAccountToken] | None:
        """The account's tokens, oldest first; None if there is no such account."""

    async def token_holder(self, client_id: str, token_id: str) -> TokenHolder | None:
        """The account with that one token's record (one read by ``_id``); None if there is no such account."""

    async def revoke_token(self, client_id: str, token_id: str) -> bool:
        """Remove the token; False if the account holds no token of that id."""

    async def record_token_use(self, client_id: str, token_id: str, now: datetime) -> None:
        """Set the token's last use to ``now``, if the token is still there."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""


class MailQueue(Protocol):
    """The outbox: mail waiting for delivery, shared by every replica."""

    async def enqueue(
        self, mail: Mail, now: datetime, *, mail_id: str | None = None, notice_of: str | None = None
    ) -> None:
        """Queue ``mail``. With ``mail_id`` (24 hex digits) it is queued under that id, and
        queueing an id that is still queued does nothing. ``notice_of``: the user whose notice
        it is a copy of (see :class:`NoticeStore`)."""

    async def claim(self, now: datetime, lease_seconds: float) -> QueuedMail | None:
        """Take the next due mail for ``lease_seconds``; after that another sender may take it."""

    async def delivered(self, mail_id: str) -> None: ...

    async def retry_later(self, mail_id: str, at: datetime, error: str) -> None: ...

    async def postpone(self, mail_id: str, at: datetime) -> None:
        """Hand a claimed mail back, due at ``at``, without counting the claim as an attempt."""

    async def give_up(self, mail_id: str, error: str, now: datetime) -> None:
        """Keep the mail, marked failed at ``now``, for an operator to inspect until housekeeping
        drops it; never retried."""


class NoticeStore(Protocol):
    """Security notices waiting in user documents, each pended by the update that made its change.

    The mail sender moves them into the outbox: claim a user's notices, queue each under its
    own id (a repeat does nothing), release them. A sender that dies between the steps only
    delays them: its claim runs out and another sender finishes the move. Before a notice's
    outbox copy goes out, :meth:`settle_notice` makes sure it waits in no user document, so
    it cannot be moved and mailed a second time.
    """

    async def claim_pending_notices(self, now: datetime, lease_seconds: float) -> PendingNotices | None:
        """Claim one user's waiting notices for ``lease_seconds``; None when none wait unclaimed."""

    async def release_notices(self, pending: PendingNotices) -> None:
        """Drop the claimed notices (now queued in the outbox) and end the claim."""

    async def settle_notice(self, user_id: str, notice_id: str, now: datetime) -> datetime | None:
        """Drop ``notice_id`` from ``user_id``'s document if it still waits there. None when done
        (or there is no such notice); else when to try again, while another sender's claim holds it."""


class MailTransport(Protocol):
    async def deliver(self, mail: QueuedMail) -> None:
        """Hand the mail to its next hop; raise if it was not accepted."""


class Housekeeping(Protocol):
    """What the housekeeping job does to the database: one replica at a time, on a lease."""

    async def take_lease(self, job: str, holder: str, now: datetime, lease_seconds: float) -> bool:
        """Hold ``job`` until ``now + lease_seconds`` unless another holder's lease is still running;
        True if ``holder`` holds it now."""

    async def purge_ended_sessions(self, ended_before: datetime) -> int:
        """Delete the sessions that expired or were revoked before ``ended_before``; how many."""

    async def purge_never_activated_users(self, created_before: datetime) -> int:
        """Delete the accounts created before ``created_before`` and never activated; how many."""

    async def purge_failed_mail(self, failed_before: datetime) -> int:
        """Delete the mail given up before ``failed_before``; how many."""

    async def purge_expired_ceremonies(self, now: datetime) -> int:
        """Passkey ceremonies past their expiry."""

    async def purge_expired_tallies(self, now: datetime) -> int:
        """Delete the throttle tallies that expired before ``now``; how many."""

    async def release_stale_claims(self, now: datetime) -> int:
        """Settle or free the name claims left pending too long (a write that never finished); how many freed."""

    async def purge_audit_events(self, recorded_before: datetime) -> int:
        """Delete the audit events recorded before ``recorded_before``; how many."""

    async def purge_changes(self, published_before: datetime) -> int:
        """Delete the change-feed changes published before ``published_before``, oldest first and
        never the newest; how many."""


class AuditTrail(Protocol):
    """The append-only audit trail: events are added and read, never changed."""

    async def add(self, event: AuditEvent) -> None: ...

    async def list_events(self, filters: AuditFilter, before: AuditPosition | None, limit: int) -> list[AuditEvent]:
        """Up to ``limit`` events matching ``filters``, newest first (by time, then id), older than
        ``before`` if given."""

    async def find_user_id(self, identifier_key: str) -> str | None:
        """The id of the user with this username or email key, if there is one: names the subject
        of a sign-in by identifier without keeping the identifier itself."""


class ChangeLog(Protocol):
    """The change feed's store (see :class:`users_grpc.adapters.mongo.change_log.MongoChangeLog` for why
    no change is lost)."""

    async def sweep(self, changed_before: datetime, limit: int = 100) -> int:
        """Publish the changes pending since before ``changed_before`` and finish deletions marked
        before then; how many users it took up."""

    async def last_sequence(self) -> int:
        """The newest change's sequence number; 0 before the first."""

    async def read_after(self, sequence: int, limit: int) -> list[UserChange]:
        """Up to ``limit`` changes numbered above ``sequence``, in order; the caller checks that
        they are consecutive."""


class MetadataStore(Protocol):
    """A user's metadata entries (SetUserMetadata and the other metadata calls), kept in the user's
    own document: each write replaces the whole set in one update conditional on its revision."""

    async def metadata_of(self, user_id: str) -> StoredMetadata | None:
        """The user's entries and their revision; None if there is no such user."""

    async def replace_metadata(
        self, user_id: str, read: StoredMetadata, entries: tuple[MetadataEntry, ...], changed: MetadataKey
    ) -> bool:
        """Store ``entries`` if the set is still at ``read.revision``, with a change of the feed
        naming ``changed``; False if it moved meanwhile (or the user is gone)."""


class WebAuthn(Protocol):
    """The relying party's WebAuthn work (py_webauthn, users_grpc/adapters/webauthn_relying_party.py):
    options as the browser's JSON, responses checked against the challenge, origins and RP id."""

    def registration_options(
        self, *, challenge: bytes, user_handle: bytes, user_name: str, exclude: list[AllowedCredential]
    ) -> str: ...

    def verify_registration(self, credential_json: str, *, challenge: bytes) -> NewCredential:
        """Raise InvalidPasskeyRegistration if it does not verify."""

    def sign_in_options(
        self, *, challenge: bytes, allow: list[AllowedCredential], user_verification_required: bool
    ) -> str: ...

    def assertion_claim(self, credential_json: str) -> AssertionClaim:
        """The credential id and user handle an assertion names; InvalidArgument if it is no assertion."""

    def verify_assertion(
        self, credential_json: str, *, challenge: bytes, public_key: bytes, user_verification_required: bool
    ) -> VerifiedAssertion:
        """Raise InvalidPasskey if it does not verify (the sign count is the caller's to judge)."""


class PasskeyRepository(Protocol):
    """Passkeys inside their users' documents, credential ids unique through claims."""

    async def passkey_holder(self, user_id: str) -> PasskeyHolder | None: ...

    async def get_account(self, user_id: str) -> Account | None: ...

    async def find_passkey_holder(self, identifier_key: str) -> PasskeyHolder | None: ...

    async def holder_of_credential(self, credential_id: bytes) -> PasskeyHolder | None:
        """The user holding the credential (by its claim), or None."""

    async def ensure_user_handle(self, user_id: str, candidate: bytes) -> bytes | None:
        """The user's WebAuthn user handle, set to ``candidate`` if it had none; None: no such user."""

    async def add_passkey(self, user_id: str, passkey: StoredPasskey, now: datetime, notice: Mail) -> bool:
        """Add it with its notice and change-feed entry in one update; AlreadyExists("credential_id")
        if any user holds the credential; False if the user is gone or holds MAX_PASSKEYS."""

    async def record_passkey_use(
        self, user_id: str, passkey_id: str, *, seen_count: int, new_count: int, backed_up: bool, now: datetime
    ) -> bool:
        """Store the new count and last use if the count is still ``seen_count``; else False."""

    async def pend_notice(self, user_id: str, notice: Mail, now: datetime) -> None: ...

    async def rename_passkey(self, user_id: str, passkey_id: str, display_name: str, now: datetime) -> bool: ...

    async def remove_passkey(self, user_id: str, passkey_id: str, now: datetime, notice: Mail) -> Removal: ...


class CeremonyStore(Protocol):
    """Challenges in the database, so that any replica finishes what another started."""

    def new_id(self) -> str: ...

    async def add(self, ceremony: Ceremony) -> None: ...

    async def take(self, ceremony_id: str, purpose: CeremonyPurpose, now: datetime) -> Ceremony | None:
        """Remove the ceremony and return it, if unexpired and for ``purpose``: of concurrent takes,
        one gets it. None otherwise."""

    async def purge_expired(self, now: datetime) -> int: ...
