"""Domain errors: what the services raise, with no gRPC or protobuf in sight.

The error interceptor turns each into its status, a short message and, where it helps the
caller, rich details, by the one table in grpc_api/status.py::

    UsersError
    ├── InvalidArgument        INVALID_ARGUMENT (google.rpc.BadRequest field violations)
    │   ├── InvalidActivationCode
    │   ├── InvalidResetToken
    │   ├── InvalidEmailChangeCode
    │   ├── InvalidPasskeyRegistration
    │   ├── MalformedRequest   (the bytes are no message of the request's type)
    │   ├── PasswordReused
    │   └── PasswordBreached
    ├── NotFound               NOT_FOUND
    │   └── MetadataNotFound   (no metadata entry of this scope and key)
    │   └── PasskeyNotFound
    ├── AlreadyExists          ALREADY_EXISTS (google.rpc.ErrorInfo names the field)
    ├── PermissionDenied       PERMISSION_DENIED
    │   └── PasswordChangeOnly (a password-change token used for another RPC)
    ├── InvalidCredentials     UNAUTHENTICATED
    ├── Unauthenticated        UNAUTHENTICATED (missing or invalid token)
    ├── InvalidSecondFactor    UNAUTHENTICATED
    ├── InvalidPasskey         UNAUTHENTICATED (one answer for every failed passkey assertion)
    │   └── PasskeyCounterRegressed
    ├── FailedPrecondition     FAILED_PRECONDITION
    │   ├── AccountNotActive
    │   ├── AccountDeactivated
    │   ├── AccountLocked
    │   ├── LastActiveAdmin
    │   ├── WrongUserState
    │   ├── MfaRequired
    │   ├── PasskeysDisabled   (the USERS_WEBAUTHN_* settings are not set)
    │   ├── LastSignInMethod
    │   ├── ReauthenticationRequired
    │   ├── PasswordChangeRequired (users.v1.PasswordChangeRequired: the password-change token)
    │   │   └── PasswordExpired
    │   └── ChangeCursorGone  (the change feed no longer holds the changes after the cursor)
    ├── EtagMismatch           ABORTED (the user changed since the etag was read)
    │   └── MetadataEtagMismatch (the metadata entry did)
    ├── TooManyAttempts        RESOURCE_EXHAUSTED (google.rpc.RetryInfo: when to try again)
    ├── TooManyRequests        RESOURCE_EXHAUSTED (RetryInfo)
    ├── Overloaded             RESOURCE_EXHAUSTED (RetryInfo)
    ├── TooManyStreams         RESOURCE_EXHAUSTED (RetryInfo)
    ├── StorageUnavailable     UNAVAILABLE
    └── PasswordCheckUnavailable UNAVAILABLE (the breached-password check, failing closed)

Anything else that escapes a service is a bug: it is logged with its traceback
and the caller sees INTERNAL with a generic message.

Every ``reason`` is part of the contract: ``users.v1.ErrorReason`` (protos/users/v1/error_reason.proto)
lists them, each as ``ERROR_REASON_<reason>``; a subclass with a reason missing there fails at import
(grpc_api/status.py holds that check, through :func:`check_error_classes`, as the domain knows no proto).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its proto name and what is wrong with it."""

    field: str
    description: str


class UsersError(Exception):
    """Base of the errors a caller can cause or see; ``reason`` is stable for machines."""

    reason = "USERS_ERROR"
    message = "request failed"
    # Set where waiting helps: the caller is told, in google.rpc.RetryInfo, how long.
    retry_after: timedelta | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for check in _class_checks:
            check(cls)

    def __init__(self, message: str | None = None, *, retry_after: timedelta | None = None) -> None:
        super().__init__(message or self.message)
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def metadata(self) -> dict[str, str]:
        """Extra facts for ``google.rpc.ErrorInfo``; never secrets."""
        return {}


# Checks each error class must pass when it is defined. The contract's (every reason is a
# users.v1.ErrorReason) is the gRPC edge's to make: grpc_api/status.py registers it.
_class_checks: list[Callable[[type[UsersError]], None]] = []


def check_error_classes(check: Callable[[type[UsersError]], None]) -> None:
    """Run ``check`` on every error class defined so far, and on each one defined from now on."""
    _class_checks.append(check)
    pending = list(UsersError.__subclasses__())
    while pending:
        cls = pending.pop()
        check(cls)
        pending.extend(cls.__subclasses__())


class InvalidArgument(UsersError):
    reason = "INVALID_ARGUMENT"
    message = "the request has invalid fields"

    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        self.violations = tuple(violations)
        fields = ", ".join(dict.fromkeys(v.field for v in self.violations))
        super().__init__(f"invalid {fields}" if fields else None)


class InvalidActivationCode(InvalidArgument):
    reason = "INVALID_ACTIVATION_CODE"

    def __init__(self) -> None:
        super().__init__([FieldViolation("code", "the code is wrong, expired or used up; request a new one")])


class InvalidResetToken(InvalidArgument):
    reason = "INVALID_RESET_TOKEN"

    def __init__(self) -> None:
        super().__init__([FieldViolation("token", "the token is wrong, expired or used; request a new one")])


class InvalidEmailChangeCode(InvalidArgument):
    reason = "INVALID_EMAIL_CHANGE_CODE"

    def __init__(self) -> None:
        super().__init__(
            [FieldViolation("code", "the code is wrong, expired or used up, or no change is pending; ask again")]
        )


class MalformedRequest(InvalidArgument):
    reason = "MALFORMED_REQUEST"
    message = "malformed request"

    def __init__(self) -> None:
        super().__init__([])


class NotFound(UsersError):
    reason = "USER_NOT_FOUND"
    message = "user not found"


class MetadataNotFound(NotFound):
    reason = "METADATA_NOT_FOUND"
    message = "the user has no metadata entry with this scope and key"


class AlreadyExists(UsersError):
    reason = "ALREADY_EXISTS"

    def __init__(self, field: str) -> None:
        self.field = field
        super().__init__(f"{field} is already taken")

    @property
    def metadata(self) -> dict[str, str]:
        return {"field": self.field}


class PermissionDenied(UsersError):
    reason = "PERMISSION_DENIED"
    message = "permission denied"


class InvalidCredentials(UsersError):
    reason = "INVALID_CREDENTIALS"
    message = "invalid credentials"


class Unauthenticated(UsersError):
    reason = "UNAUTHENTICATED"
    message = "a valid access token is required"


class InvalidSecondFactor(UsersError):
    reason = "INVALID_SECOND_FACTOR"
    message = "invalid code"


class FailedPrecondition(UsersError):
    reason = "FAILED_PRECONDITION"


class MfaRequired(FailedPrecondition):
    reason = "MFA_REQUIRED"
    message = "a second factor is required: send totp_code or recovery_code"


class EtagMismatch(UsersError):
    """A conditional change (AIP-154) found the resource changed since its etag was read."""

    reason = "ETAG_MISMATCH"
    message = "the user changed since the etag was read; read it again and retry"


class MetadataEtagMismatch(EtagMismatch):
    message = "the metadata entry changed (or is gone) since the etag was read; read it again and retry"


class TooManyAttempts(UsersError):
    """Too many failed tries of a password or code: wait, then try again."""

    reason = "TOO_MANY_ATTEMPTS"
    message = "too many failed attempts; try again later"


class TooManyRequests(UsersError):
    """The caller's address made more costly anonymous calls than its share."""

    reason = "RATE_LIMITED"
    message = "too many requests from this address; try again later"


class Overloaded(UsersError):
    """The server has no room for this call now (calls in progress, or password hashing queued):
    refused at once rather than queued until every caller times out."""

    reason = "OVERLOADED"
    message = "the server is busy; try again shortly"


class TooManyStreams(UsersError):
    """The caller holds its share of this replica's change streams: one caller may not take them all."""

    reason = "TOO_MANY_STREAMS"
    message = "you have as many change streams open here as you may; close one first"


class AccountNotActive(FailedPrecondition):
    reason = "ACCOUNT_NOT_ACTIVE"
    message = "the account is not activated; use the emailed code or request a new one"


class AccountDeactivated(FailedPrecondition):
    reason = "ACCOUNT_DEACTIVATED"
    message = "the account is deactivated; contact an administrator"


class AccountLocked(FailedPrecondition):
    reason = "ACCOUNT_LOCKED"
    message = "the account is locked; contact an administrator"


class LastActiveAdmin(FailedPrecondition):
    reason = "LAST_ACTIVE_ADMIN"
    message = "the user is the last active admin; make another admin first"


class WrongUserState(FailedPrecondition):
    """An admin action that does not apply to the account's current state."""

    reason = "WRONG_USER_STATE"


class ChangeCursorGone(FailedPrecondition):
    """WatchUserChanges: the changes right after the cursor are no longer kept; the consumer must resync."""

    reason = "CHANGE_CURSOR_EXPIRED"
    message = (
        "the changes after this cursor are no longer kept (USERS_CHANGE_RETENTION_DAYS): read the users "
        "again (ListUsers) and watch with an empty cursor"
    )


class PasskeysDisabled(FailedPrecondition):
    reason = "PASSKEYS_DISABLED"
    message = "passkeys are off: USERS_WEBAUTHN_RP_ID, USERS_WEBAUTHN_RP_NAME and USERS_WEBAUTHN_ORIGINS are not set"


class InvalidPasskey(UsersError):
    """A passkey assertion that did not verify, for whatever reason: one answer, as for passwords."""

    reason = "INVALID_PASSKEY"
    message = "the passkey could not be verified; start a new sign-in"


class PasskeyCounterRegressed(InvalidPasskey):
    """The authenticator's sign count did not increase: two copies of the credential may exist."""

    reason = "PASSKEY_COUNTER_REGRESSED"
    message = "the passkey's sign count did not increase: it may have been cloned; the sign-in is refused"


class InvalidPasskeyRegistration(InvalidArgument):
    reason = "INVALID_PASSKEY_REGISTRATION"

    def __init__(
        self, field: str = "credential_json", description: str = "the registration did not verify; start again"
    ) -> None:
        super().__init__([FieldViolation(field, description)])


class PasskeyNotFound(NotFound):
    reason = "PASSKEY_NOT_FOUND"
    message = "no such passkey on this account"


class LastSignInMethod(FailedPrecondition):
    reason = "LAST_SIGN_IN_METHOD"
    message = "this is the account's last way to sign in; set a password or add another passkey first"


class ReauthenticationRequired(FailedPrecondition):
    reason = "REAUTHENTICATION_REQUIRED"
    message = "send the current password, or sign in again first"


class StorageUnavailable(UsersError):
    reason = "STORAGE_UNAVAILABLE"
    message = "the service is temporarily unavailable; retry later"


class PasswordChangeRequired(FailedPrecondition):
    """The password was right, but must be changed before any session opens.

    Carries the password-change token (a secret): never in the message nor the ErrorInfo
    metadata, which refusals' logs and the audit trail may show; grpc_api/status.py puts it in a
    detail of its own.
    """

    reason = "PASSWORD_CHANGE_REQUIRED"
    message = "the password must be changed: call ChangePassword with the token of this status's details"

    def __init__(self, *, user_id: str, token: str, expires_at: datetime) -> None:
        super().__init__()
        self.user_id = user_id
        self.token = token
        self.expires_at = expires_at

    def __repr__(self) -> str:  # the token never shows in a traceback or a log of the error
        return f"{type(self).__name__}(user_id={self.user_id!r})"


class PasswordExpired(PasswordChangeRequired):
    reason = "PASSWORD_EXPIRED"
    message = "the password is too old: change it with the token of this status's details"


class PasswordReused(InvalidArgument):
    reason = "PASSWORD_REUSED"

    def __init__(self, field: str, history: int) -> None:
        super().__init__([FieldViolation(field, f"must differ from your last {history} passwords")])


class PasswordBreached(InvalidArgument):
    reason = "PASSWORD_BREACHED"

    def __init__(self, field: str) -> None:
        super().__init__(
            [FieldViolation(field, "appears in a list of passwords exposed in data breaches; choose another")]
        )


class PasswordChangeOnly(PermissionDenied):
    reason = "PASSWORD_CHANGE_ONLY"
    message = "this token allows ChangePassword only"


class PasswordCheckUnavailable(UsersError):
    """The breached-password check could not be made, and it fails closed."""

    reason = "PASSWORD_CHECK_UNAVAILABLE"
    message = "the password could not be checked against breached passwords; retry later"


class ConfigError(ValueError):
    """A ``USERS_*`` variable holds a value the service cannot use."""
