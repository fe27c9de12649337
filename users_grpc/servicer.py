"""The gRPC face of :class:`~users_grpc.service.UserService`.

Each method parses its request, calls the service and converts the result.
Errors are not handled here: the error interceptor maps them to statuses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from users.v1 import session_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc
from users_grpc.access import current_caller, stream_admission
from users_grpc.admin import AdminService
from users_grpc.audit import AuditLog
from users_grpc.changes import ChangeFeed, cursor_of
from users_grpc.directory import DirectoryService
from users_grpc.domain import (
    AccessClaims,
    ActorKind,
    AuditEvent,
    AuditEventType,
    AuditFilter,
    ChangeType,
    Gender,
    ImportedUser,
    IssuedTokens,
    ProfileChanges,
    Registration,
    Role,
    ServiceAccount,
    Session,
    User,
    UserChange,
    UserFilter,
    UserState,
    identifier_key,
    validate_prefix,
)
from users_grpc.email_change import EmailChangeService
from users_grpc.errors import FieldViolation, InvalidArgument, to_rpc_status
from users_grpc.mfa import MfaService
from users_grpc.recovery import PasswordService
from users_grpc.service import UserService
from users_grpc.service_accounts import ServiceAccountService
from users_grpc.sessions import SessionService

_GENDERS = {
    user_pb2.GENDER_UNSPECIFIED: Gender.UNSPECIFIED,
    user_pb2.GENDER_MALE: Gender.MALE,
    user_pb2.GENDER_FEMALE: Gender.FEMALE,
    user_pb2.GENDER_OTHER: Gender.OTHER,
}
_GENDERS_TO_PROTO = {domain: wire for wire, domain in _GENDERS.items()}
_ROLES = {
    user_pb2.ROLE_UNSPECIFIED: Role.USER,
    user_pb2.ROLE_USER: Role.USER,
    user_pb2.ROLE_ADMIN: Role.ADMIN,
}
_ROLES_TO_PROTO = {Role.USER: user_pb2.ROLE_USER, Role.ADMIN: user_pb2.ROLE_ADMIN}
# Where a role is required: ROLE_UNSPECIFIED is not taken to mean ROLE_USER.
_ASSIGNED_ROLES = {user_pb2.ROLE_USER: Role.USER, user_pb2.ROLE_ADMIN: Role.ADMIN}
_STATES_TO_PROTO = {
    UserState.PENDING_ACTIVATION: user_pb2.USER_STATE_PENDING_ACTIVATION,
    UserState.ACTIVE: user_pb2.USER_STATE_ACTIVE,
    UserState.DEACTIVATED: user_pb2.USER_STATE_DEACTIVATED,
    UserState.LOCKED: user_pb2.USER_STATE_LOCKED,
}

_STATES = {wire: domain for domain, wire in _STATES_TO_PROTO.items()}
# By name: AUDIT_EVENT_TYPE_SIGN_IN is AuditEventType.SIGN_IN.
_AUDIT_TYPES_TO_PROTO = {t: user_service_pb2.AuditEventType.Value(f"AUDIT_EVENT_TYPE_{t.name}") for t in AuditEventType}
_AUDIT_TYPES = {wire: domain for domain, wire in _AUDIT_TYPES_TO_PROTO.items()}
_ACTOR_KINDS_TO_PROTO = {k: user_service_pb2.AuditActorKind.Value(f"AUDIT_ACTOR_KIND_{k.name}") for k in ActorKind}

_K = TypeVar("_K", bound=int)
_E = TypeVar("_E")

Context = grpc.aio.ServicerContext[object, object]


class UserServiceServicer(user_service_pb2_grpc.UserServiceServicer):
    def __init__(
        self,
        service: UserService,
        sessions: SessionService,
        passwords: PasswordService,
        mfa: MfaService,
        email_changes: EmailChangeService,
        admin: AdminService,
        service_accounts: ServiceAccountService,
        directory: DirectoryService,
        audit: AuditLog,
        changes: ChangeFeed,
    ) -> None:
        self._service = service
        self._sessions = sessions
        self._passwords = passwords
        self._mfa = mfa
        self._email_changes = email_changes
        self._admin = admin
        self._service_accounts = service_accounts
        self._directory = directory
        self._audit = audit
        self._changes = changes

    async def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: Context
    ) -> user_service_pb2.CreateUserResponse:
        user = await self._service.create_user(
            Registration(
                username=request.username,
                first_name=request.first_name,
                last_name=request.last_name,
                email=request.email,
                password=request.password,
                password_confirmation=request.password_confirmation,
                gender=_enum_from_proto(_GENDERS, request.gender, "gender"),
                role=_enum_from_proto(_ROLES, request.role, "role"),
            ),
            caller=current_caller.get(),
        )
        return user_service_pb2.CreateUserResponse(user=user_to_proto(user))

    async def ActivateUser(
        self, request: user_service_pb2.ActivateUserRequest, context: Context
    ) -> user_service_pb2.ActivateUserResponse:
        user = await self._service.activate_user(request.identifier, request.code, request.token)
        return user_service_pb2.ActivateUserResponse(user=user_to_proto(user))

    async def ResendActivationCode(
        self, request: user_service_pb2.ResendActivationCodeRequest, context: Context
    ) -> user_service_pb2.ResendActivationCodeResponse:
        await self._service.resend_activation_code(request.identifier)
        return user_service_pb2.ResendActivationCodeResponse()

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: Context
    ) -> user_service_pb2.GetUserResponse:
        user = await self._service.get_user(request.id, caller=current_caller.get())
        return user_service_pb2.GetUserResponse(user=user_to_proto(user))

    async def GetUserByIdentifier(
        self, request: user_service_pb2.GetUserByIdentifierRequest, context: Context
    ) -> user_service_pb2.GetUserByIdentifierResponse:
        user = await self._service.get_active_user_by_identifier(request.identifier)
        return user_service_pb2.GetUserByIdentifierResponse(user=user_to_proto(user))

    async def DeleteUser(
        self, request: user_service_pb2.DeleteUserRequest, context: Context
    ) -> user_service_pb2.DeleteUserResponse:
        await self._service.delete_user(request.id, password=request.password, caller=current_caller.get())
        return user_service_pb2.DeleteUserResponse()

    async def DeleteUserByIdentifier(
        self, request: user_service_pb2.DeleteUserByIdentifierRequest, context: Context
    ) -> user_service_pb2.DeleteUserByIdentifierResponse:
        await self._service.delete_user_by_identifier(request.identifier)
        return user_service_pb2.DeleteUserByIdentifierResponse()

    async def VerifyCredentials(
        self, request: user_service_pb2.VerifyCredentialsRequest, context: Context
    ) -> user_service_pb2.VerifyCredentialsResponse:
        user = await self._mfa.verify_login(
            request.identifier,
            request.password,
            request.totp_code,
            request.recovery_code,
            source=current_caller.get().source,
        )
        return user_service_pb2.VerifyCredentialsResponse(user=user_to_proto(user))

    async def Authenticate(
        self, request: user_service_pb2.AuthenticateRequest, context: Context
    ) -> user_service_pb2.AuthenticateResponse:
        user, issued = await self._sessions.authenticate(
            request.identifier,
            request.password,
            request.totp_code,
            request.recovery_code,
            source=current_caller.get().source,
        )
        return _with_tokens(user_service_pb2.AuthenticateResponse(user=user_to_proto(user)), issued)

    async def RefreshSession(
        self, request: user_service_pb2.RefreshSessionRequest, context: Context
    ) -> user_service_pb2.RefreshSessionResponse:
        issued = await self._sessions.refresh(request.refresh_token)
        return _with_tokens(user_service_pb2.RefreshSessionResponse(), issued)

    async def RevokeSession(
        self, request: user_service_pb2.RevokeSessionRequest, context: Context
    ) -> user_service_pb2.RevokeSessionResponse:
        await self._sessions.revoke(request.refresh_token)
        return user_service_pb2.RevokeSessionResponse()

    async def ListSessions(
        self, request: user_service_pb2.ListSessionsRequest, context: Context
    ) -> user_service_pb2.ListSessionsResponse:
        sessions = await self._sessions.list_sessions(request.user_id)
        return user_service_pb2.ListSessionsResponse(sessions=[_session_to_proto(s) for s in sessions])

    async def RevokeAllSessions(
        self, request: user_service_pb2.RevokeAllSessionsRequest, context: Context
    ) -> user_service_pb2.RevokeAllSessionsResponse:
        await self._sessions.revoke_all(request.user_id)
        return user_service_pb2.RevokeAllSessionsResponse()

    async def GetPublicKeys(
        self, request: user_service_pb2.GetPublicKeysRequest, context: Context
    ) -> user_service_pb2.GetPublicKeysResponse:
        return user_service_pb2.GetPublicKeysResponse(jwks_json=json.dumps(self._sessions.public_keys()))

    async def ValidateToken(
        self, request: user_service_pb2.ValidateTokenRequest, context: Context
    ) -> user_service_pb2.ValidateTokenResponse:
        claims = await self._sessions.validate(request.access_token)
        return user_service_pb2.ValidateTokenResponse(claims=_claims_to_proto(claims))

    async def ForgotPassword(
        self, request: user_service_pb2.ForgotPasswordRequest, context: Context
    ) -> user_service_pb2.ForgotPasswordResponse:
        await self._passwords.forgot_password(request.identifier)
        return user_service_pb2.ForgotPasswordResponse()

    async def ResetPassword(
        self, request: user_service_pb2.ResetPasswordRequest, context: Context
    ) -> user_service_pb2.ResetPasswordResponse:
        await self._passwords.reset_password(
            request.token, request.new_password, request.new_password_confirmation, source=current_caller.get().source
        )
        return user_service_pb2.ResetPasswordResponse()

    async def ChangePassword(
        self, request: user_service_pb2.ChangePasswordRequest, context: Context
    ) -> user_service_pb2.ChangePasswordResponse:
        await self._passwords.change_password(
            request.user_id,
            request.current_password,
            request.new_password,
            request.new_password_confirmation,
            source=current_caller.get().source,
        )
        return user_service_pb2.ChangePasswordResponse()

    async def EnableMfa(
        self, request: user_service_pb2.EnableMfaRequest, context: Context
    ) -> user_service_pb2.EnableMfaResponse:
        enrollment = await self._mfa.enable(request.user_id, request.password, source=current_caller.get().source)
        return user_service_pb2.EnableMfaResponse(
            secret=enrollment.secret, otpauth_uri=enrollment.otpauth_uri, qr_code_png=enrollment.qr_code_png
        )

    async def GetMfaQrCode(
        self, request: user_service_pb2.GetMfaQrCodeRequest, context: Context
    ) -> user_service_pb2.GetMfaQrCodeResponse:
        enrollment = await self._mfa.qr_code(request.user_id)
        return user_service_pb2.GetMfaQrCodeResponse(
            otpauth_uri=enrollment.otpauth_uri, qr_code_png=enrollment.qr_code_png
        )

    async def ConfirmMfa(
        self, request: user_service_pb2.ConfirmMfaRequest, context: Context
    ) -> user_service_pb2.ConfirmMfaResponse:
        codes = await self._mfa.confirm(request.user_id, request.code)
        return user_service_pb2.ConfirmMfaResponse(recovery_codes=codes)

    async def DisableMfa(
        self, request: user_service_pb2.DisableMfaRequest, context: Context
    ) -> user_service_pb2.DisableMfaResponse:
        await self._mfa.disable(request.user_id, request.password, request.code, source=current_caller.get().source)
        return user_service_pb2.DisableMfaResponse()

    async def RegenerateRecoveryCodes(
        self, request: user_service_pb2.RegenerateRecoveryCodesRequest, context: Context
    ) -> user_service_pb2.RegenerateRecoveryCodesResponse:
        codes = await self._mfa.regenerate_recovery_codes(request.user_id, request.code)
        return user_service_pb2.RegenerateRecoveryCodesResponse(recovery_codes=codes)

    async def ChangeEmail(
        self, request: user_service_pb2.ChangeEmailRequest, context: Context
    ) -> user_service_pb2.ChangeEmailResponse:
        await self._email_changes.change_email(
            request.user_id, request.new_email, request.password, source=current_caller.get().source
        )
        return user_service_pb2.ChangeEmailResponse()

    async def ConfirmEmailChange(
        self, request: user_service_pb2.ConfirmEmailChangeRequest, context: Context
    ) -> user_service_pb2.ConfirmEmailChangeResponse:
        user = await self._email_changes.confirm_email_change(request.user_id, request.code)
        return user_service_pb2.ConfirmEmailChangeResponse(user=user_to_proto(user))

    async def SetUserEmail(
        self, request: user_service_pb2.SetUserEmailRequest, context: Context
    ) -> user_service_pb2.SetUserEmailResponse:
        user = await self._email_changes.set_user_email(request.user_id, request.email)
        return user_service_pb2.SetUserEmailResponse(user=user_to_proto(user))

    async def SetUserRole(
        self, request: user_service_pb2.SetUserRoleRequest, context: Context
    ) -> user_service_pb2.SetUserRoleResponse:
        if request.role == user_pb2.ROLE_UNSPECIFIED:
            raise InvalidArgument([FieldViolation("role", "is required: ROLE_USER or ROLE_ADMIN")])
        user = await self._admin.set_role(request.user_id, _enum_from_proto(_ASSIGNED_ROLES, request.role, "role"))
        return user_service_pb2.SetUserRoleResponse(user=user_to_proto(user))

    async def DeactivateUser(
        self, request: user_service_pb2.DeactivateUserRequest, context: Context
    ) -> user_service_pb2.DeactivateUserResponse:
        user = await self._admin.deactivate(request.user_id)
        return user_service_pb2.DeactivateUserResponse(user=user_to_proto(user))

    async def ReactivateUser(
        self, request: user_service_pb2.ReactivateUserRequest, context: Context
    ) -> user_service_pb2.ReactivateUserResponse:
        user = await self._admin.reactivate(request.user_id)
        return user_service_pb2.ReactivateUserResponse(user=user_to_proto(user))

    async def LockUser(
        self, request: user_service_pb2.LockUserRequest, context: Context
    ) -> user_service_pb2.LockUserResponse:
        user = await self._admin.lock(request.user_id)
        return user_service_pb2.LockUserResponse(user=user_to_proto(user))

    async def UnlockUser(
        self, request: user_service_pb2.UnlockUserRequest, context: Context
    ) -> user_service_pb2.UnlockUserResponse:
        user = await self._admin.unlock(request.user_id)
        return user_service_pb2.UnlockUserResponse(user=user_to_proto(user))

    async def ResetUserMfa(
        self, request: user_service_pb2.ResetUserMfaRequest, context: Context
    ) -> user_service_pb2.ResetUserMfaResponse:
        user = await self._admin.reset_mfa(request.user_id)
        return user_service_pb2.ResetUserMfaResponse(user=user_to_proto(user))

    async def ImportUsers(
        self, request: user_service_pb2.ImportUsersRequest, context: Context
    ) -> user_service_pb2.ImportUsersResponse:
        results = await self._service.import_users(
            [_imported_user(item) for item in request.users], caller=current_caller.get()
        )
        return user_service_pb2.ImportUsersResponse(
            results=[
                user_service_pb2.ImportUserResult(user=user_to_proto(result))
                if isinstance(result, User)
                else user_service_pb2.ImportUserResult(error=to_rpc_status(result))
                for result in results
            ]
        )

    async def CreateServiceAccount(
        self, request: user_service_pb2.CreateServiceAccountRequest, context: Context
    ) -> user_service_pb2.CreateServiceAccountResponse:
        account, secret = await self._service_accounts.create(request.name, caller=current_caller.get())
        return user_service_pb2.CreateServiceAccountResponse(
            service_account=_service_account_to_proto(account), client_secret=secret
        )

    async def IssueServiceToken(
        self, request: user_service_pb2.IssueServiceTokenRequest, context: Context
    ) -> user_service_pb2.IssueServiceTokenResponse:
        token, expires_at = await self._service_accounts.issue_token(
            request.client_id, request.client_secret, source=current_caller.get().source
        )
        return user_service_pb2.IssueServiceTokenResponse(
            access_token=token, access_token_expires_at=_timestamp(expires_at)
        )

    async def ListServiceAccounts(
        self, request: user_service_pb2.ListServiceAccountsRequest, context: Context
    ) -> user_service_pb2.ListServiceAccountsResponse:
        accounts, next_page_token = await self._service_accounts.list(request.page_size, request.page_token)
        return user_service_pb2.ListServiceAccountsResponse(
            service_accounts=[_service_account_to_proto(a) for a in accounts], next_page_token=next_page_token
        )

    async def DeleteServiceAccount(
        self, request: user_service_pb2.DeleteServiceAccountRequest, context: Context
    ) -> user_service_pb2.DeleteServiceAccountResponse:
        await self._service_accounts.delete(request.client_id, caller=current_caller.get())
        return user_service_pb2.DeleteServiceAccountResponse()

    async def ListUsers(
        self, request: user_service_pb2.ListUsersRequest, context: Context
    ) -> user_service_pb2.ListUsersResponse:
        validate_prefix(request.prefix)
        filters = UserFilter(
            role=None
            if request.role == user_pb2.ROLE_UNSPECIFIED
            else _enum_from_proto(_ASSIGNED_ROLES, request.role, "role"),
            state=None
            if request.state == user_pb2.USER_STATE_UNSPECIFIED
            else _enum_from_proto(_STATES, request.state, "state"),
            mfa_enabled=request.mfa_enabled if request.HasField("mfa_enabled") else None,
            prefix_key=identifier_key(request.prefix) if request.prefix.strip() else "",
            created_after=request.created_after.ToDatetime(UTC) if request.HasField("created_after") else None,
            created_before=request.created_before.ToDatetime(UTC) if request.HasField("created_before") else None,
        )
        users, next_page_token, total = await self._directory.list_users(filters, request.page_size, request.page_token)
        return user_service_pb2.ListUsersResponse(
            users=[user_to_proto(u) for u in users], next_page_token=next_page_token, total_size=total
        )

    async def UpdateUser(
        self, request: user_service_pb2.UpdateUserRequest, context: Context
    ) -> user_service_pb2.UpdateUserResponse:
        if request.user.id and request.user.id != request.user_id:
            raise InvalidArgument([FieldViolation("user.id", "must be empty or equal user_id")])
        paths = list(request.update_mask.paths)
        changes = ProfileChanges(
            first_name=request.user.first_name if "first_name" in paths else None,
            last_name=request.user.last_name if "last_name" in paths else None,
            gender=_enum_from_proto(_GENDERS, request.user.gender, "user.gender") if "gender" in paths else None,
            username=request.user.username if "username" in paths else None,
        )
        user = await self._directory.update_user(request.user_id, paths, changes, request.etag)
        return user_service_pb2.UpdateUserResponse(user=user_to_proto(user))

    async def ListAuditEvents(
        self, request: user_service_pb2.ListAuditEventsRequest, context: Context
    ) -> user_service_pb2.ListAuditEventsResponse:
        types = set()
        for number in request.types:
            if number == user_service_pb2.AUDIT_EVENT_TYPE_UNSPECIFIED:
                raise InvalidArgument([FieldViolation("types", "AUDIT_EVENT_TYPE_UNSPECIFIED is no type")])
            types.add(_enum_from_proto(_AUDIT_TYPES, number, "types"))
        filters = AuditFilter(
            subject_id=request.subject_id,
            actor_id=request.actor_id,
            types=frozenset(types),
            start_time=request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None,
            end_time=request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None,
        )
        events, next_page_token = await self._audit.list_events(filters, request.page_size, request.page_token)
        return user_service_pb2.ListAuditEventsResponse(
            audit_events=[_audit_event_to_proto(e) for e in events], next_page_token=next_page_token
        )

    async def WatchUserChanges(
        self, request: user_service_pb2.WatchUserChangesRequest, context: Context
    ) -> AsyncGenerator[user_service_pb2.WatchUserChangesResponse, None]:
        watched = self._changes.watch(request.after, still_admitted=stream_admission.get())
        async with contextlib.aclosing(watched) as changes:
            async for change in changes:
                yield user_service_pb2.WatchUserChangesResponse(change=_change_to_proto(change))


def _imported_user(item: user_service_pb2.ImportedUser) -> ImportedUser | InvalidArgument:
    """The item as a domain value, or (an unknown enum number) the error that item answers."""
    try:
        gender = _enum_from_proto(_GENDERS, item.gender, "gender")
        role = _enum_from_proto(_ROLES, item.role, "role")
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
    )


def _audit_event_to_proto(event: AuditEvent) -> user_service_pb2.AuditEvent:
    return user_service_pb2.AuditEvent(
        id=event.id,
        type=_AUDIT_TYPES_TO_PROTO[event.type],
        time=_timestamp(event.time),
        actor=user_service_pb2.AuditActor(
            kind=_ACTOR_KINDS_TO_PROTO[event.actor.kind], id=event.actor.id, source_address=event.actor.source
        ),
        subject_id=event.subject_id,
        status_code=event.status_code,  # a google.rpc.Code number: the gRPC status number
        error_reason=event.error_reason,
        reason=event.reason,
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
}


def _change_to_proto(change: UserChange) -> user_service_pb2.UserChange:
    return user_service_pb2.UserChange(
        cursor=cursor_of(change.sequence),
        user_id=change.user_id,
        type=_CHANGE_TYPES_TO_PROTO[change.type],
        change_time=_timestamp(change.changed_at),
        user=None if change.user is None else user_to_proto(change.user),
        user_change_number=change.number,
    )


def _service_account_to_proto(account: ServiceAccount) -> user_service_pb2.ServiceAccount:
    return user_service_pb2.ServiceAccount(
        client_id=account.client_id, name=account.name, create_time=_timestamp(account.created_at)
    )


def user_to_proto(user: User) -> user_pb2.User:
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
        updated_at=_timestamp(user.updated_at),
        mfa_enabled=user.mfa_enabled,
        state=_STATES_TO_PROTO[user.state],
        etag=user.etag,
    )


def _enum_from_proto(values: Mapping[_K, _E], number: _K, field: str) -> _E:
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
    "_TokensResponse", user_service_pb2.AuthenticateResponse, user_service_pb2.RefreshSessionResponse
)


def _with_tokens(response: _TokensResponse, issued: IssuedTokens) -> _TokensResponse:
    response.access_token = issued.access_token
    response.access_token_expires_at.CopyFrom(_timestamp(issued.access_token_expires_at))
    response.refresh_token = issued.refresh_token
    response.refresh_token_expires_at.CopyFrom(_timestamp(issued.session.expires_at))
    response.session_id = issued.session.id
    return response


def _session_to_proto(session: Session) -> session_pb2.Session:
    return session_pb2.Session(
        id=session.id,
        user_id=session.user_id,
        created_at=_timestamp(session.created_at),
        last_used_at=_timestamp(session.last_used_at),
        expires_at=_timestamp(session.expires_at),
    )


def _claims_to_proto(claims: AccessClaims) -> session_pb2.TokenClaims:
    return session_pb2.TokenClaims(
        subject=claims.subject,
        role=_ROLES_TO_PROTO[claims.role],
        session_id=claims.session_id,
        token_id=claims.token_id,
        issuer=claims.issuer,
        audience=claims.audience,
        issued_at=_timestamp(claims.issued_at),
        expires_at=_timestamp(claims.expires_at),
    )
