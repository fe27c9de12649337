"""The gRPC face of :class:`~users_grpc.services.accounts.UserService`.

Each method parses its request, calls the service and converts the result.
Errors are not handled here: the error interceptor maps them to statuses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from datetime import UTC

import grpc

from users.v1 import metadata_pb2, passkey_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc
from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.metadata import MetadataFilter, validate_key
from users_grpc.domain.model import AuditFilter, ProfileChanges, Registration, User, UserFilter
from users_grpc.domain.rules import identifier_key, validate_external_id, validate_prefix
from users_grpc.grpc_api.convert import (
    ASSIGNED_ROLES,
    AUDIT_TYPES,
    GENDERS,
    PERMISSIONS,
    ROLES,
    STATES,
    _timestamp,
    audit_event_to_proto,
    change_to_proto,
    claims_to_proto,
    enum_from_proto,
    factors_to_proto,
    imported_user,
    metadata_entry_to_proto,
    passkey_to_proto,
    requested_user_id,
    scope_from_proto,
    service_account_to_proto,
    session_to_proto,
    user_to_proto,
    with_tokens,
)
from users_grpc.grpc_api.groups_servicer import GroupRpcs
from users_grpc.grpc_api.service_account_tokens_servicer import ServiceAccountTokenRpcs
from users_grpc.grpc_api.status import to_rpc_status
from users_grpc.pipeline.current import current_caller, stream_admission
from users_grpc.services.accounts import AccountService
from users_grpc.services.admin import AdminService
from users_grpc.services.audit import AuditLog
from users_grpc.services.changes import ChangeFeed
from users_grpc.services.directory import DirectoryService
from users_grpc.services.email_change import EmailChangeService
from users_grpc.services.groups import GroupService
from users_grpc.services.metadata import MetadataService
from users_grpc.services.mfa import MfaService
from users_grpc.services.passkeys import PasskeyService
from users_grpc.services.passwords import PasswordService
from users_grpc.services.service_accounts import ServiceAccountService
from users_grpc.services.sessions import SessionService

Context = grpc.aio.ServicerContext[object, object]


class UserServiceServicer(GroupRpcs, ServiceAccountTokenRpcs, user_service_pb2_grpc.UserServiceServicer):
    def __init__(
        self,
        service: AccountService,
        sessions: SessionService,
        passwords: PasswordService,
        mfa: MfaService,
        email_changes: EmailChangeService,
        admin: AdminService,
        service_accounts: ServiceAccountService,
        directory: DirectoryService,
        audit: AuditLog,
        changes: ChangeFeed,
        metadata: MetadataService,
        groups: GroupService,
        passkeys: PasskeyService,
    ) -> None:
        self._passkeys = passkeys
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
        self._metadata = metadata
        self._groups = groups

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
                gender=enum_from_proto(GENDERS, request.gender, "gender"),
                role=enum_from_proto(ROLES, request.role, "role"),
                language_code=request.language_code,
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
        caller = current_caller.get()
        user = await self._service.get_user(requested_user_id(request) or "", caller=caller)
        admin_view = caller.is_admin or caller.machine is not None
        return user_service_pb2.GetUserResponse(user=user_to_proto(user, admin_view=admin_view))

    async def GetUserByIdentifier(
        self, request: user_service_pb2.GetUserByIdentifierRequest, context: Context
    ) -> user_service_pb2.GetUserByIdentifierResponse:
        user = await self._service.get_active_user_by_identifier(request.identifier)
        # Admins and machine callers only (access.py): their view.
        return user_service_pb2.GetUserByIdentifierResponse(user=user_to_proto(user, admin_view=True))

    async def DeleteUser(
        self, request: user_service_pb2.DeleteUserRequest, context: Context
    ) -> user_service_pb2.DeleteUserResponse:
        user_id = requested_user_id(request) or ""
        await self._service.delete_user(user_id, password=request.password, caller=current_caller.get())
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
            passkey=(request.passkey_ceremony_id, request.passkey_credential_json),
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
            passkey=(request.passkey_ceremony_id, request.passkey_credential_json),
        )
        return with_tokens(user_service_pb2.AuthenticateResponse(user=user_to_proto(user)), issued)

    async def RefreshSession(
        self, request: user_service_pb2.RefreshSessionRequest, context: Context
    ) -> user_service_pb2.RefreshSessionResponse:
        issued = await self._sessions.refresh(request.refresh_token)
        return with_tokens(user_service_pb2.RefreshSessionResponse(), issued)

    async def RevokeSession(
        self, request: user_service_pb2.RevokeSessionRequest, context: Context
    ) -> user_service_pb2.RevokeSessionResponse:
        await self._sessions.revoke(request.refresh_token)
        return user_service_pb2.RevokeSessionResponse()

    async def ListSessions(
        self, request: user_service_pb2.ListSessionsRequest, context: Context
    ) -> user_service_pb2.ListSessionsResponse:
        sessions = await self._sessions.list_sessions(request.user_id)
        return user_service_pb2.ListSessionsResponse(sessions=[session_to_proto(s) for s in sessions])

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
        return user_service_pb2.ValidateTokenResponse(claims=claims_to_proto(claims))

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
        user = await self._admin.set_role(request.user_id, enum_from_proto(ASSIGNED_ROLES, request.role, "role"))
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
            [imported_user(item) for item in request.users], caller=current_caller.get()
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
        permissions = frozenset(enum_from_proto(PERMISSIONS, number, "permissions") for number in request.permissions)
        account, secret = await self._service_accounts.create(
            request.name, caller=current_caller.get(), permissions=permissions
        )
        return user_service_pb2.CreateServiceAccountResponse(
            service_account=service_account_to_proto(account), client_secret=secret
        )

    async def IssueServiceToken(
        self, request: user_service_pb2.IssueServiceTokenRequest, context: Context
    ) -> user_service_pb2.IssueServiceTokenResponse:
        token, expires_at = await self._service_accounts.issue_token(
            request.client_id, request.client_secret, source=current_caller.get().source
        )
        return user_service_pb2.IssueServiceTokenResponse(
            access_token=token, access_token_expire_time=_timestamp(expires_at)
        )

    async def ListServiceAccounts(
        self, request: user_service_pb2.ListServiceAccountsRequest, context: Context
    ) -> user_service_pb2.ListServiceAccountsResponse:
        accounts, next_page_token = await self._service_accounts.list(request.page_size, request.page_token)
        return user_service_pb2.ListServiceAccountsResponse(
            service_accounts=[service_account_to_proto(a) for a in accounts], next_page_token=next_page_token
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
        validate_external_id(request.external_id)
        filters = UserFilter(
            role=None
            if request.role == user_pb2.ROLE_UNSPECIFIED
            else enum_from_proto(ASSIGNED_ROLES, request.role, "role"),
            state=None
            if request.state == user_pb2.USER_STATE_UNSPECIFIED
            else enum_from_proto(STATES, request.state, "state"),
            mfa_enabled=request.mfa_enabled if request.HasField("mfa_enabled") else None,
            prefix_key=identifier_key(request.prefix) if request.prefix.strip() else "",
            created_after=request.start_create_time.ToDatetime(UTC) if request.HasField("start_create_time") else None,
            created_before=request.end_create_time.ToDatetime(UTC) if request.HasField("end_create_time") else None,
            metadata=_metadata_filter(request.metadata) if request.HasField("metadata") else None,
            external_id=request.external_id,
        )
        users, next_page_token, total = await self._directory.list_users(
            filters, request.page_size, request.page_token, count=request.include_total_size
        )
        # Admins only (access.py): their view. Not counted: 0, as the contract says.
        return user_service_pb2.ListUsersResponse(
            users=[user_to_proto(u, admin_view=True) for u in users],
            next_page_token=next_page_token,
            total_size=total or 0,
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
            gender=enum_from_proto(GENDERS, request.user.gender, "user.gender") if "gender" in paths else None,
            username=request.user.username if "username" in paths else None,
            language_code=request.user.language_code if "language_code" in paths else None,
            external_id=request.user.external_id if "external_id" in paths else None,
        )
        user = await self._directory.update_user(
            request.user_id, paths, changes, request.etag, caller=current_caller.get()
        )
        return user_service_pb2.UpdateUserResponse(user=user_to_proto(user))

    async def ListAuditEvents(
        self, request: user_service_pb2.ListAuditEventsRequest, context: Context
    ) -> user_service_pb2.ListAuditEventsResponse:
        types = set()
        for number in request.types:
            if number == user_service_pb2.AUDIT_EVENT_TYPE_UNSPECIFIED:
                raise InvalidArgument([FieldViolation("types", "AUDIT_EVENT_TYPE_UNSPECIFIED is no type")])
            types.add(enum_from_proto(AUDIT_TYPES, number, "types"))
        filters = AuditFilter(
            subject_id=request.subject_id,
            actor_id=request.actor_id,
            types=frozenset(types),
            start_time=request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None,
            end_time=request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None,
        )
        events, next_page_token = await self._audit.list_events(filters, request.page_size, request.page_token)
        return user_service_pb2.ListAuditEventsResponse(
            audit_events=[audit_event_to_proto(e) for e in events], next_page_token=next_page_token
        )

    async def WatchUserChanges(
        self, request: user_service_pb2.WatchUserChangesRequest, context: Context
    ) -> AsyncGenerator[user_service_pb2.WatchUserChangesResponse, None]:
        watched = self._changes.watch(request.after, still_admitted=stream_admission.get())
        async with contextlib.aclosing(watched) as changes:
            async for change in changes:
                yield user_service_pb2.WatchUserChangesResponse(change=change_to_proto(change))

    async def SetUserMetadata(
        self, request: metadata_pb2.SetUserMetadataRequest, context: Context
    ) -> metadata_pb2.SetUserMetadataResponse:
        entry = await self._metadata.set(
            request.user_id,
            scope_from_proto(request.scope),
            request.key,
            request.value,
            request.etag,
            caller=current_caller.get(),
        )
        return metadata_pb2.SetUserMetadataResponse(entry=metadata_entry_to_proto(entry))

    async def GetUserMetadata(
        self, request: metadata_pb2.GetUserMetadataRequest, context: Context
    ) -> metadata_pb2.GetUserMetadataResponse:
        entry = await self._metadata.get(
            request.user_id, scope_from_proto(request.scope), request.key, caller=current_caller.get()
        )
        return metadata_pb2.GetUserMetadataResponse(entry=metadata_entry_to_proto(entry))

    async def ListUserMetadata(
        self, request: metadata_pb2.ListUserMetadataRequest, context: Context
    ) -> metadata_pb2.ListUserMetadataResponse:
        entries = await self._metadata.list(
            request.user_id, scope_from_proto(request.scope), caller=current_caller.get()
        )
        return metadata_pb2.ListUserMetadataResponse(entries=[metadata_entry_to_proto(e) for e in entries])

    async def DeleteUserMetadata(
        self, request: metadata_pb2.DeleteUserMetadataRequest, context: Context
    ) -> metadata_pb2.DeleteUserMetadataResponse:
        await self._metadata.delete(
            request.user_id, scope_from_proto(request.scope), request.key, request.etag, caller=current_caller.get()
        )
        return metadata_pb2.DeleteUserMetadataResponse()

    async def StartPasskeyRegistration(
        self, request: passkey_pb2.StartPasskeyRegistrationRequest, context: Context
    ) -> passkey_pb2.StartPasskeyRegistrationResponse:
        ceremony, options = await self._passkeys.start_registration(
            request.user_id, request.password, caller=current_caller.get()
        )
        return passkey_pb2.StartPasskeyRegistrationResponse(
            ceremony_id=ceremony.id, options_json=options, expire_time=_timestamp(ceremony.expires_at)
        )

    async def FinishPasskeyRegistration(
        self, request: passkey_pb2.FinishPasskeyRegistrationRequest, context: Context
    ) -> passkey_pb2.FinishPasskeyRegistrationResponse:
        passkey = await self._passkeys.finish_registration(
            request.user_id, request.ceremony_id, request.credential_json, request.display_name
        )
        return passkey_pb2.FinishPasskeyRegistrationResponse(passkey=passkey_to_proto(passkey))

    async def StartPasskeySignIn(
        self, request: passkey_pb2.StartPasskeySignInRequest, context: Context
    ) -> passkey_pb2.StartPasskeySignInResponse:
        ceremony, options = await self._passkeys.start_sign_in(request.identifier, request.second_factor)
        return passkey_pb2.StartPasskeySignInResponse(
            ceremony_id=ceremony.id, options_json=options, expire_time=_timestamp(ceremony.expires_at)
        )

    async def FinishPasskeySignIn(
        self, request: passkey_pb2.FinishPasskeySignInRequest, context: Context
    ) -> passkey_pb2.FinishPasskeySignInResponse:
        user, issued = await self._sessions.sign_in_with_passkey(
            request.ceremony_id, request.credential_json, source=current_caller.get().source
        )
        return with_tokens(passkey_pb2.FinishPasskeySignInResponse(user=user_to_proto(user)), issued)

    async def ListAuthenticationFactors(
        self, request: passkey_pb2.ListAuthenticationFactorsRequest, context: Context
    ) -> passkey_pb2.ListAuthenticationFactorsResponse:
        holder = await self._passkeys.factors(request.user_id)
        return passkey_pb2.ListAuthenticationFactorsResponse(factors=factors_to_proto(holder))

    async def RenamePasskey(
        self, request: passkey_pb2.RenamePasskeyRequest, context: Context
    ) -> passkey_pb2.RenamePasskeyResponse:
        passkey = await self._passkeys.rename(request.user_id, request.passkey_id, request.display_name)
        return passkey_pb2.RenamePasskeyResponse(passkey=passkey_to_proto(passkey))

    async def RemovePasskey(
        self, request: passkey_pb2.RemovePasskeyRequest, context: Context
    ) -> passkey_pb2.RemovePasskeyResponse:
        await self._passkeys.remove(request.user_id, request.passkey_id, request.password, caller=current_caller.get())
        return passkey_pb2.RemovePasskeyResponse()

    async def ListUserAuthenticationFactors(
        self, request: passkey_pb2.ListUserAuthenticationFactorsRequest, context: Context
    ) -> passkey_pb2.ListUserAuthenticationFactorsResponse:
        holder = await self._passkeys.factors(request.user_id)
        return passkey_pb2.ListUserAuthenticationFactorsResponse(factors=factors_to_proto(holder))

    async def RemoveUserPasskey(
        self, request: passkey_pb2.RemoveUserPasskeyRequest, context: Context
    ) -> passkey_pb2.RemoveUserPasskeyResponse:
        await self._passkeys.remove_by_admin(request.user_id, request.passkey_id)
        return passkey_pb2.RemoveUserPasskeyResponse()

    async def SetPassword(
        self, request: user_service_pb2.SetPasswordRequest, context: Context
    ) -> user_service_pb2.SetPasswordResponse:
        user = await self._passwords.set_password(
            request.user_id, request.password, request.password_confirmation, change_required=request.change_required
        )
        return user_service_pb2.SetPasswordResponse(user=user_to_proto(user))


def _metadata_filter(wanted: metadata_pb2.MetadataFilter) -> MetadataFilter:
    scope = scope_from_proto(wanted.scope, "metadata.scope")
    if scope is None:
        raise InvalidArgument(
            [FieldViolation("metadata.scope", "is required: METADATA_SCOPE_ADMIN or METADATA_SCOPE_SELF")]
        )
    validate_key(wanted.key, "metadata.key")
    return MetadataFilter(scope=scope, key=wanted.key, value=wanted.value if wanted.HasField("value") else None)
