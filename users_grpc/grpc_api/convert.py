"""Conversions between protobuf messages and domain types, for the servicer."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from users.v1 import metadata_pb2, passkey_pb2, session_pb2, user_pb2, user_service_pb2
from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.metadata import MetadataEntry, MetadataScope
from users_grpc.domain.model import (
    AccessClaims,
    ActorKind,
    AuditEvent,
    AuditEventType,
    ChangeType,
    Gender,
    ImportedUser,
    IssuedTokens,
    Role,
    ServiceAccount,
    ServiceAccountPermission,
    Session,
    User,
    UserChange,
    UserState,
)
from users_grpc.domain.passkeys import PasskeyHolder, StoredPasskey
from users_grpc.services.changes import cursor_of

GENDERS = {
    user_pb2.GENDER_UNSPECIFIED: Gender.UNSPECIFIED,
    user_pb2.GENDER_MALE: Gender.MALE,
    user_pb2.GENDER_FEMALE: Gender.FEMALE,
    user_pb2.GENDER_OTHER: Gender.OTHER,
}
_GENDERS_TO_PROTO = {domain: wire for wire, domain in GENDERS.items()}
ROLES = {
    user_pb2.ROLE_UNSPECIFIED: Role.USER,
    user_pb2.ROLE_USER: Role.USER,
    user_pb2.ROLE_ADMIN: Role.ADMIN,
}
_ROLES_TO_PROTO = {Role.USER: user_pb2.ROLE_USER, Role.ADMIN: user_pb2.ROLE_ADMIN}
# Where a role is required: ROLE_UNSPECIFIED is not taken to mean ROLE_USER.
ASSIGNED_ROLES = {user_pb2.ROLE_USER: Role.USER, user_pb2.ROLE_ADMIN: Role.ADMIN}
_STATES_TO_PROTO = {
    UserState.PENDING_ACTIVATION: user_pb2.USER_STATE_PENDING_ACTIVATION,
    UserState.ACTIVE: user_pb2.USER_STATE_ACTIVE,
    UserState.DEACTIVATED: user_pb2.USER_STATE_DEACTIVATED,
    UserState.LOCKED: user_pb2.USER_STATE_LOCKED,
}

STATES = {wire: domain for domain, wire in _STATES_TO_PROTO.items()}
# By name: AUDIT_EVENT_TYPE_SIGN_IN is AuditEventType.SIGN_IN.
_AUDIT_TYPES_TO_PROTO = {t: user_service_pb2.AuditEventType.Value(f"AUDIT_EVENT_TYPE_{t.name}") for t in AuditEventType}
AUDIT_TYPES = {wire: domain for domain, wire in _AUDIT_TYPES_TO_PROTO.items()}
_PERMISSIONS_TO_PROTO = {
    p: user_service_pb2.ServiceAccountPermission.Value(f"SERVICE_ACCOUNT_PERMISSION_{p.name}")
    for p in ServiceAccountPermission
}
PERMISSIONS = {wire: domain for domain, wire in _PERMISSIONS_TO_PROTO.items()}
_ACTOR_KINDS_TO_PROTO = {k: user_service_pb2.AuditActorKind.Value(f"AUDIT_ACTOR_KIND_{k.name}") for k in ActorKind}

_K = TypeVar("_K", bound=int)
_E = TypeVar("_E")


def imported_user(item: user_service_pb2.ImportedUser) -> ImportedUser | InvalidArgument:
    """The item as a domain value, or (an unknown enum number) the error that item answers."""
    try:
        gender = enum_from_proto(GENDERS, item.gender, "gender")
        role = enum_from_proto(ROLES, item.role, "role")
    except InvalidArgument as error:
        return error
    return ImportedUser(
        username=item.username,
        first_name=item.first_name,
        last_name=item.last_name,
        email=item.email,
        gender=gender,
        role=role,
        email_verified=item.email_verified,
        password_hash=item.password_hash,
        password_change_required=item.password_change_required,
        external_id=item.external_id,
    )


def audit_event_to_proto(event: AuditEvent) -> user_service_pb2.AuditEvent:
    return user_service_pb2.AuditEvent(
        id=event.id,
        type=_AUDIT_TYPES_TO_PROTO[event.type],
        event_time=_timestamp(event.time),
        actor=user_service_pb2.AuditActor(
            kind=_ACTOR_KINDS_TO_PROTO[event.actor.kind], id=event.actor.id, source_address=event.actor.source
        ),
        subject_id=event.subject_id,
        status_code=event.status_code,  # a google.rpc.Code number: the gRPC status number
        error_reason=event.error_reason,
        note=event.reason,
    )


_CHANGE_TYPES_TO_PROTO = {
    ChangeType.CREATED: user_service_pb2.USER_CHANGE_TYPE_CREATED,
    ChangeType.ACTIVATED: user_service_pb2.USER_CHANGE_TYPE_ACTIVATED,
    ChangeType.UPDATED: user_service_pb2.USER_CHANGE_TYPE_UPDATED,
    ChangeType.EMAIL_CHANGED: user_service_pb2.USER_CHANGE_TYPE_EMAIL_CHANGED,
    ChangeType.ROLE_CHANGED: user_service_pb2.USER_CHANGE_TYPE_ROLE_CHANGED,
    ChangeType.DEACTIVATED: user_service_pb2.USER_CHANGE_TYPE_DEACTIVATED,
    ChangeType.REACTIVATED: user_service_pb2.USER_CHANGE_TYPE_REACTIVATED,
    ChangeType.LOCKED: user_service_pb2.USER_CHANGE_TYPE_LOCKED,
    ChangeType.UNLOCKED: user_service_pb2.USER_CHANGE_TYPE_UNLOCKED,
    ChangeType.DELETED: user_service_pb2.USER_CHANGE_TYPE_DELETED,
    ChangeType.METADATA_CHANGED: user_service_pb2.USER_CHANGE_TYPE_METADATA_CHANGED,
    ChangeType.GROUP_MEMBER_ADDED: user_service_pb2.USER_CHANGE_TYPE_GROUP_MEMBER_ADDED,
    ChangeType.GROUP_MEMBER_REMOVED: user_service_pb2.USER_CHANGE_TYPE_GROUP_MEMBER_REMOVED,
    ChangeType.PASSKEY_ADDED: user_service_pb2.USER_CHANGE_TYPE_PASSKEY_ADDED,
    ChangeType.PASSKEY_REMOVED: user_service_pb2.USER_CHANGE_TYPE_PASSKEY_REMOVED,
    ChangeType.PASSKEY_USED: user_service_pb2.USER_CHANGE_TYPE_PASSKEY_USED,
}


def change_to_proto(change: UserChange) -> user_service_pb2.UserChange:
    return user_service_pb2.UserChange(
        cursor=cursor_of(change.sequence),
        user_id=change.user_id,
        type=_CHANGE_TYPES_TO_PROTO[change.type],
        change_time=_timestamp(change.changed_at),
        # The feed is for admins and machine callers only: their view.
        user=None if change.user is None else user_to_proto(change.user, admin_view=True),
        user_change_number=change.number,
        metadata_keys=[
            metadata_pb2.MetadataKey(scope=_SCOPES_TO_PROTO[key.scope], key=key.key) for key in change.metadata_keys
        ],
        group_id=change.group_id,
    )


def service_account_to_proto(account: ServiceAccount) -> user_service_pb2.ServiceAccount:
    return user_service_pb2.ServiceAccount(
        client_id=account.client_id,
        name=account.name,
        create_time=_timestamp(account.created_at),
        permissions=sorted(_PERMISSIONS_TO_PROTO[permission] for permission in account.permissions),
    )


# Every deprecated field of a reply is filled here, beside the field that replaced it and with the
# same value (docs/contract.md), so an old client and a new one read the same thing.


def user_to_proto(user: User, *, admin_view: bool = False) -> user_pb2.User:
    """The user as replies show it; ``admin_view`` (only for an admin or a machine caller) adds the
    metadata of both scopes, which the user's own view never shows."""
    return user_pb2.User(
        id=user.id,
        username=user.username,
        first_name=user.first_name,
        last_name=user.last_name,
        email=user.email,
        gender=_GENDERS_TO_PROTO[user.gender],
        role=_ROLES_TO_PROTO[user.role],
        is_active=user.is_active,
        created_at=_timestamp(user.created_at),
        create_time=_timestamp(user.created_at),
        updated_at=_timestamp(user.updated_at),
        update_time=_timestamp(user.updated_at),
        mfa_enabled=user.mfa_enabled,
        state=_STATES_TO_PROTO[user.state],
        etag=user.etag,
        language_code=user.language_code,
        metadata=[metadata_entry_to_proto(entry) for entry in user.metadata] if admin_view else [],
        password_change_required=user.password_change_required,
        password_update_time=None if user.password_changed_at is None else _timestamp(user.password_changed_at),
        external_id=user.external_id,
    )


SCOPES = {metadata_pb2.METADATA_SCOPE_ADMIN: MetadataScope.ADMIN, metadata_pb2.METADATA_SCOPE_SELF: MetadataScope.SELF}
_SCOPES_TO_PROTO = {domain: wire for wire, domain in SCOPES.items()}


def scope_from_proto(number: metadata_pb2.MetadataScope.ValueType, field: str = "scope") -> MetadataScope | None:
    """None for METADATA_SCOPE_UNSPECIFIED (each call says what that means); unknown numbers are refused."""
    if number == metadata_pb2.METADATA_SCOPE_UNSPECIFIED:
        return None
    return enum_from_proto(SCOPES, number, field)


def metadata_entry_to_proto(entry: MetadataEntry) -> metadata_pb2.MetadataEntry:
    return metadata_pb2.MetadataEntry(
        scope=_SCOPES_TO_PROTO[entry.scope],
        key=entry.key,
        value=entry.value,
        etag=entry.etag,
        update_time=_timestamp(entry.updated_at),
    )


def requested_user_id(request: object) -> str | None:
    """The id of the user a request names, for the access rule, the audit and the call alike (one
    reading, so the "the user themself" check cannot read one id while the call acts on another):
    its ``user_id``, or GetUser's and DeleteUser's deprecated ``id``, which either may be given for
    (both only if equal, else InvalidArgument). None when the request has no such field."""
    if isinstance(request, user_service_pb2.GetUserRequest | user_service_pb2.DeleteUserRequest):
        if request.id and request.user_id and request.id != request.user_id:
            raise InvalidArgument([FieldViolation("id", "deprecated, use user_id: differs from user_id")])
        return request.user_id or request.id
    value = getattr(request, "user_id", None)
    return value if isinstance(value, str) else None


def enum_from_proto(values: Mapping[_K, _E], number: _K, field: str) -> _E:
    # proto3 enums are open: an unknown number arrives intact and must be refused.
    try:
        return values[number]
    except KeyError:
        raise InvalidArgument([FieldViolation(field, f"unknown value {number}")]) from None


def _timestamp(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


_TokensResponse = TypeVar(
    "_TokensResponse",
    user_service_pb2.AuthenticateResponse,
    user_service_pb2.RefreshSessionResponse,
    passkey_pb2.FinishPasskeySignInResponse,
)


def with_tokens(response: _TokensResponse, issued: IssuedTokens) -> _TokensResponse:
    response.access_token = issued.access_token
    response.access_token_expires_at.CopyFrom(_timestamp(issued.access_token_expires_at))
    response.access_token_expire_time.CopyFrom(_timestamp(issued.access_token_expires_at))
    response.refresh_token = issued.refresh_token
    response.refresh_token_expires_at.CopyFrom(_timestamp(issued.session.expires_at))
    response.refresh_token_expire_time.CopyFrom(_timestamp(issued.session.expires_at))
    response.session_id = issued.session.id
    return response


def session_to_proto(session: Session) -> session_pb2.Session:
    return session_pb2.Session(
        id=session.id,
        user_id=session.user_id,
        created_at=_timestamp(session.created_at),
        create_time=_timestamp(session.created_at),
        last_used_at=_timestamp(session.last_used_at),
        last_use_time=_timestamp(session.last_used_at),
        expires_at=_timestamp(session.expires_at),
        expire_time=_timestamp(session.expires_at),
    )


def claims_to_proto(claims: AccessClaims) -> session_pb2.TokenClaims:
    return session_pb2.TokenClaims(
        subject=claims.subject,
        role=_ROLES_TO_PROTO[claims.role],
        session_id=claims.session_id,
        token_id=claims.token_id,
        issuer=claims.issuer,
        audience=claims.audience,
        issued_at=_timestamp(claims.issued_at),
        issue_time=_timestamp(claims.issued_at),
        expires_at=_timestamp(claims.expires_at),
        expire_time=_timestamp(claims.expires_at),
        groups=claims.groups,
    )


def passkey_to_proto(passkey: StoredPasskey) -> passkey_pb2.Passkey:
    """Never the credential id or public key: a list need not identify the authenticator."""
    message = passkey_pb2.Passkey(
        id=passkey.id,
        display_name=passkey.display_name,
        create_time=_timestamp(passkey.created_at),
        aaguid=passkey.aaguid,
        backup_eligible=passkey.backup_eligible,
        backed_up=passkey.backed_up,
        transports=list(passkey.transports),
    )
    if passkey.last_used_at is not None:
        message.last_use_time.CopyFrom(_timestamp(passkey.last_used_at))
    return message


def factors_to_proto(holder: PasskeyHolder) -> passkey_pb2.AuthenticationFactors:
    return passkey_pb2.AuthenticationFactors(
        password_set=holder.password_set,
        totp_enabled=holder.totp_enabled,
        recovery_codes_remaining=holder.recovery_codes_remaining,
        passkeys=[passkey_to_proto(p) for p in holder.passkeys],
    )
