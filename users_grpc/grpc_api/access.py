"""Who may call what: one table of rules, enforced for every RPC by the call pipeline's guard.

A caller is identified by ``authorization: Bearer <access token>`` or, for
internal services, by an mTLS client certificate with a URI SAN (a SPIFFE ID) or DNS SAN
listed in USERS_MACHINE_IDENTITIES, or by a service account's access token (both are machine
callers). The proto comments state the same rules.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Protocol

from users.v1 import user_pb2
from users_grpc.domain.errors import PasswordChangeOnly, PermissionDenied, Unauthenticated
from users_grpc.domain.model import ANONYMOUS, AccessClaims, Caller, Role, User
from users_grpc.domain.rules import is_id
from users_grpc.grpc_api.convert import requested_user_id
from users_grpc.services.throttling import Flow
from users_grpc.services.tokens import is_password_change_token, is_service_token


class Rule(enum.Enum):
    ANYONE = "anyone"
    SELF = "the user themself"
    SELF_OR_ADMIN = "the user themself or an admin"
    SELF_ADMIN_OR_MACHINE = "the user themself, an admin or a machine caller"
    ADMIN_OR_MACHINE = "an admin or a machine caller"
    ADMIN = "an admin"
    ADMIN_OR_PROVISIONER = "an admin or a provisioning service account"
    SELF_ADMIN_OR_PROVISIONER = "the user themself, an admin or a provisioning service account"


RULES: Mapping[str, Rule] = {
    "CreateUser": Rule.ANYONE,  # asking for ROLE_ADMIN needs an admin: checked by the service
    "ActivateUser": Rule.ANYONE,
    "ResendActivationCode": Rule.ANYONE,
    "GetUser": Rule.SELF_ADMIN_OR_MACHINE,
    "GetUserByIdentifier": Rule.ADMIN_OR_MACHINE,
    "DeleteUser": Rule.SELF_ADMIN_OR_PROVISIONER,
    "DeleteUserByIdentifier": Rule.ADMIN,
    "VerifyCredentials": Rule.ADMIN_OR_MACHINE,
    "Authenticate": Rule.ANYONE,
    "RefreshSession": Rule.ANYONE,
    "RevokeSession": Rule.ANYONE,
    "ListSessions": Rule.SELF_OR_ADMIN,
    "RevokeAllSessions": Rule.SELF_OR_ADMIN,
    "GetPublicKeys": Rule.ANYONE,
    "ValidateToken": Rule.ADMIN_OR_MACHINE,
    "ForgotPassword": Rule.ANYONE,
    "ResetPassword": Rule.ANYONE,
    "ChangePassword": Rule.SELF,
    "EnableMfa": Rule.SELF,
    "GetMfaQrCode": Rule.SELF,
    "ConfirmMfa": Rule.SELF,
    "DisableMfa": Rule.SELF,
    "RegenerateRecoveryCodes": Rule.SELF,
    "ChangeEmail": Rule.SELF,
    "ConfirmEmailChange": Rule.SELF,
    "SetUserEmail": Rule.ADMIN_OR_PROVISIONER,
    "SetUserRole": Rule.ADMIN,
    "DeactivateUser": Rule.ADMIN_OR_PROVISIONER,
    "ReactivateUser": Rule.ADMIN_OR_PROVISIONER,
    "LockUser": Rule.ADMIN,
    "UnlockUser": Rule.ADMIN,
    "ResetUserMfa": Rule.ADMIN,
    "ImportUsers": Rule.ADMIN_OR_PROVISIONER,
    "CreateServiceAccount": Rule.ADMIN,
    "IssueServiceToken": Rule.ANYONE,  # whoever holds a secret: checked (and throttled) by the service
    "ListServiceAccounts": Rule.ADMIN,
    "DeleteServiceAccount": Rule.ADMIN,
    "ListUsers": Rule.ADMIN_OR_PROVISIONER,
    "UpdateUser": Rule.SELF_ADMIN_OR_PROVISIONER,
    "ListAuditEvents": Rule.ADMIN,
    "WatchUserChanges": Rule.ADMIN_OR_MACHINE,
    # Which scope, and writes by machine callers: checked by the service (services/metadata.py).
    "SetUserMetadata": Rule.SELF_ADMIN_OR_MACHINE,
    "GetUserMetadata": Rule.SELF_ADMIN_OR_MACHINE,
    "ListUserMetadata": Rule.SELF_ADMIN_OR_MACHINE,
    "DeleteUserMetadata": Rule.SELF_ADMIN_OR_MACHINE,
    "CreateGroup": Rule.ADMIN,
    "RenameGroup": Rule.ADMIN,
    "DeleteGroup": Rule.ADMIN,
    "ListGroups": Rule.ADMIN_OR_MACHINE,
    "AddGroupMember": Rule.ADMIN,
    "RemoveGroupMember": Rule.ADMIN,
    "ListGroupMembers": Rule.ADMIN_OR_MACHINE,
    "ListUserGroups": Rule.SELF_ADMIN_OR_MACHINE,
    "StartPasskeyRegistration": Rule.SELF,
    "FinishPasskeyRegistration": Rule.SELF,
    "StartPasskeySignIn": Rule.ANYONE,
    "FinishPasskeySignIn": Rule.ANYONE,
    "ListAuthenticationFactors": Rule.SELF,
    "RenamePasskey": Rule.SELF,
    "RemovePasskey": Rule.SELF,
    "ListUserAuthenticationFactors": Rule.ADMIN,
    "RemoveUserPasskey": Rule.ADMIN,
    "SetPassword": Rule.ADMIN,
    "CreateServiceAccountToken": Rule.ADMIN,
    "ListServiceAccountTokens": Rule.ADMIN,
    "RevokeServiceAccountToken": Rule.ADMIN,
}

# What a password-change token (Authenticate's PasswordChangeRequired) admits, whatever the rules
# above say: its holder proved the password but may not use the account until they change it.
PASSWORD_CHANGE_ONLY_METHODS = frozenset({"ChangePassword"})

# The flow of every call anyone may make (a test holds it to the RULES' ANYONE methods). Those that
# cost a password hash or a mail have a per-source budget per flow, whatever token comes with them
# (anyone can register and get one), except an admin's; a machine caller is limited by the end
# user's address it passes.
FLOWS: Mapping[str, Flow] = {
    "CreateUser": Flow.SIGN_UP,
    "ActivateUser": Flow.ACTIVATION,
    "ResendActivationCode": Flow.ACTIVATION,
    "Authenticate": Flow.SIGN_IN,
    "IssueServiceToken": Flow.SIGN_IN,  # a service account's sign-in, with its secret
    "ForgotPassword": Flow.RECOVERY,
    "ResetPassword": Flow.RECOVERY,
    "RefreshSession": Flow.SESSION,
    "RevokeSession": Flow.SESSION,
    "GetPublicKeys": Flow.PUBLIC_KEYS,
    # A passkey sign-in is a sign-in: the same per-source budget as a password's.
    "StartPasskeySignIn": Flow.SIGN_IN,
    "FinishPasskeySignIn": Flow.SIGN_IN,
}

# The calls of a provisioning service account that change the user they name: refused for an admin.
PROVISIONING_WRITES = frozenset({"UpdateUser", "SetUserEmail", "DeactivateUser", "ReactivateUser", "DeleteUser"})


class UserTokenChecker(Protocol):
    """What the authorizer needs of the sessions (services/sessions.py, wired in bootstrap.py)."""

    async def check_access_token(self, access_token: str) -> tuple[AccessClaims, User]: ...

    async def check_password_change_token(self, token: str) -> User: ...


class ServiceTokenChecker(Protocol):
    """What the authorizer needs of the service accounts (services/service_accounts.py, wired in bootstrap.py)."""

    async def caller_of(self, access_token: str) -> Caller: ...


class UserReader(Protocol):
    """A user by id (adapters/mongo/users.py, wired in bootstrap.py), for :meth:`Authorizer.admit_subject`."""

    async def get(self, user_id: str) -> User | None: ...


class Authorizer:
    def __init__(
        self,
        *,
        sessions: UserTokenChecker,
        service_accounts: ServiceTokenChecker,
        machine_identities: Iterable[str],
        users: UserReader | None = None,
    ) -> None:
        self._users = users
        self._sessions = sessions
        self._service_accounts = service_accounts
        self._machine_identities = frozenset(machine_identities)

    async def caller_of(self, method: str, bearer_token: str | None, peer_identities: Iterable[str]) -> Caller:
        """Who calls ``method``, not yet whether its rule admits them (see :meth:`admit`)."""
        rule = RULES.get(method)
        if rule is None:
            raise PermissionDenied("no access rule covers this method")  # fail closed
        if rule is Rule.ANYONE:
            # Clients often attach a stale token to every call (even RefreshSession): ignore a bad one here.
            try:
                return await self.identify(bearer_token, peer_identities)
            except Unauthenticated:
                return ANONYMOUS
        return await self.identify(bearer_token, peer_identities)

    def admit(self, method: str, request: object, caller: Caller) -> None:
        """Unauthenticated or PermissionDenied unless ``method``'s rule admits ``caller``."""
        rule = RULES.get(method)
        if rule is None:
            raise PermissionDenied("no access rule covers this method")
        if caller.password_change_only and method not in PASSWORD_CHANGE_ONLY_METHODS:
            raise PasswordChangeOnly()  # before ANYONE: such a token opens no other door at all
        if rule is Rule.ANYONE:
            return
        if caller.user_id is None and caller.machine is None:
            raise Unauthenticated()
        if not _admits(rule, caller, requested_user_id(request)):
            raise PermissionDenied()
        if caller.is_provisioner and not caller.is_admin and _imports_an_admin(request):
            raise PermissionDenied("provisioning cannot create admins")

    async def admit_subject(self, method: str, request: object, caller: Caller) -> None:
        """PermissionDenied when a provisioning service account names an admin: provisioning makes
        and unmakes people, never admins (the one read this costs is paid by provisioning calls only)."""
        subject = requested_user_id(request)
        if not caller.is_provisioner or caller.is_admin or method not in PROVISIONING_WRITES or not subject:
            return
        if self._users is None:
            raise PermissionDenied("no user reader to check the subject with")  # fail closed
        user = None if not is_id(subject) else await self._users.get(subject)
        if user is not None and user.role is Role.ADMIN:
            raise PermissionDenied("provisioning cannot change admins")

    async def readmit(
        self, method: str, request: object, bearer_token: str | None, peer_identities: Iterable[str]
    ) -> None:
        """Unauthenticated or PermissionDenied unless the caller admitted to ``method`` still would
        be: :meth:`caller_of` and :meth:`admit` again, so the token's signature, key and expiry (by
        the service's clock), then one read of its account (a user's token version, role and
        state; that a service account still exists)."""
        self.admit(method, request, await self.caller_of(method, bearer_token, peer_identities))

    async def identify(self, bearer_token: str | None, peer_identities: Iterable[str]) -> Caller:
        if bearer_token is not None:
            if is_service_token(bearer_token):
                return await self._service_accounts.caller_of(bearer_token)
            if is_password_change_token(bearer_token):
                # No role: even an admin's such token grants nothing but their own ChangePassword.
                user = await self._sessions.check_password_change_token(bearer_token)
                return Caller(user_id=user.id, password_change_only=True, user=user)
            claims, user = await self._sessions.check_access_token(bearer_token)
            return Caller(user_id=user.id, role=user.role, session_id=claims.session_id, user=user)
        machine = next((name for name in peer_identities if name in self._machine_identities), None)
        return ANONYMOUS if machine is None else Caller(machine=machine)


def _admits(rule: Rule, caller: Caller, subject: str | None) -> bool:
    is_self = caller.user_id is not None and caller.user_id == subject
    machine = caller.machine is not None
    return {
        Rule.SELF: is_self,
        Rule.SELF_OR_ADMIN: is_self or caller.is_admin,
        Rule.SELF_ADMIN_OR_MACHINE: is_self or caller.is_admin or machine,
        Rule.ADMIN_OR_MACHINE: caller.is_admin or machine,
        Rule.ADMIN: caller.is_admin,
        Rule.ADMIN_OR_PROVISIONER: caller.is_admin or caller.is_provisioner,
        Rule.SELF_ADMIN_OR_PROVISIONER: is_self or caller.is_admin or caller.is_provisioner,
    }[rule]


def _imports_an_admin(request: object) -> bool:
    items = getattr(request, "users", None)
    return isinstance(items, Iterable) and any(getattr(item, "role", None) == user_pb2.ROLE_ADMIN for item in items)
