"""The audit trail's one table of RPCs, which the pipeline's audit step (pipeline/audit.py) records
by, on both edges. It reads the contract's messages (their fields and enum names), so it lives
here, at the edge that knows them.

Each row of :data:`AUDITED` names the event type of an RPC, how to find the subject (a request
or response field), and an optional short note. Every grant of the admin role is a ROLE_CHANGE
event whose subject is the new admin and whose note begins "role ROLE_ADMIN", whichever RPC made
it: SetUserRole, CreateUser asking for ROLE_ADMIN, and each admin an ImportUsers created (an event
of its own beside the import's counts), so that one filter finds every admin ever made.

Subjects and notes are ids and enum names only: never a password, code, token, hash or secret,
and never a raw identifier (people type passwords into the username field), which is resolved to
the account's id or left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from users.v1 import metadata_pb2, user_pb2
from users_grpc.domain import model, rules
from users_grpc.domain.errors import InvalidArgument
from users_grpc.domain.metadata import validate_key
from users_grpc.domain.model import AuditEventType
from users_grpc.grpc_api.convert import requested_user_id
from users_grpc.pipeline.audit import Audited

_Part = Callable[[Any, Any], str]  # (request, response or None on failure) -> text

_ADMIN_GRANTED = f"role {user_pb2.Role.Name(user_pb2.ROLE_ADMIN)}"


def _id_in_request(field: str) -> _Part:
    """The request's ``field`` if it has the form of an id; anything else the caller sent is not kept."""

    def subject(request: Any, _response: Any) -> str:
        value = getattr(request, field)
        return value if rules.is_id(value) else ""

    return subject


def _requested_user(request: Any, _response: Any) -> str:
    """The user the request names (GetUser's and DeleteUser's user_id or deprecated id), read as the call reads it."""
    try:
        user_id = requested_user_id(request) or ""
    except InvalidArgument:  # both names, differing: the call was refused, and names no one
        return ""
    return user_id if rules.is_id(user_id) else ""


def _user_in_response(_request: Any, response: Any) -> str:
    return "" if response is None else str(response.user.id)


def _created_service_account(_request: Any, response: Any) -> str:
    return "" if response is None else str(response.service_account.client_id)


def _created_token(_request: Any, response: Any) -> str:
    # The token's id, never the token: the id is the part a list shows.
    return "" if response is None else f"token {response.service_account_token.id}"


def _token_named(request: Any, _response: Any) -> str:
    return f"token {request.token_id}" if rules.is_id(request.token_id) else ""


def _reset_token_user(request: Any, _response: Any) -> str:
    # A reset token is "<user id>.<secret>": the id part names the user and is no secret; the
    # rest is never read here.
    user_id = str(request.token).partition(".")[0]
    return user_id if rules.is_id(user_id) else ""


def _second_factor(request: Any, _response: Any) -> str:
    # Which kind of proof, never the proof: a passkey's second step reads "passkey".
    return "passkey" if request.passkey_ceremony_id else ""


def _role_asked(request: Any, _response: Any) -> str:
    known = request.role in user_pb2.Role.values()
    return f"role {user_pb2.Role.Name(request.role)}" if known else f"role {int(request.role)}"


def _asks_for_admin(request: Any) -> bool:
    return bool(request.role == user_pb2.ROLE_ADMIN)


def _made_admin_at_creation(_request: Any, _response: Any) -> str:
    return f"{_ADMIN_GRANTED}, at creation"


def _imported_admins(_request: Any, response: Any) -> list[str]:
    """The ids of the admins an import created (none if the call failed as a whole)."""
    if response is None:
        return []
    return [
        str(result.user.id)
        for result in response.results
        if result.HasField("user") and result.user.role == user_pb2.ROLE_ADMIN
    ]


def _import_counts(request: Any, response: Any) -> str:
    if response is None:
        return f"{len(request.users)} users sent"
    created = sum(1 for result in response.results if result.HasField("user"))
    return f"created {created}, refused {len(response.results) - created}"


def _created_group(_request: Any, response: Any) -> str:
    return "" if response is None else str(response.group.id)


def _group_named(request: Any, _response: Any) -> str:
    # The group's id only, if it has the form of one: never the free text of a name.
    return f"group {request.group_id}" if rules.is_id(request.group_id) else ""


def _change_required(request: Any, _response: Any) -> str:
    return "change required" if request.change_required else ""


def _fields_updated(request: Any, _response: Any) -> str:
    # Only the known field names: a path is free text the caller chose.
    fields = sorted({path for path in request.update_mask.paths if path in model.UPDATABLE_FIELDS})
    return f"fields {','.join(fields)}" if fields else ""


def _metadata_key(request: Any, _response: Any) -> str:
    """The scope and key written, never the value: an admin-scope value is another service's
    fact about the user (a billing id, say), and a self-scope one is text of the user's choosing."""
    known = request.scope in metadata_pb2.MetadataScope.values()
    scope = metadata_pb2.MetadataScope.Name(request.scope) if known else str(int(request.scope))
    try:
        validate_key(request.key)
    except InvalidArgument:
        return f"scope {scope}, a malformed key"  # free text the caller chose: not kept
    return f"scope {scope}, key {request.key}"


_USER_ID = _id_in_request("user_id")

# Bare RPC names of users.v1.UserService. Refresh is left out: routine and frequent, it checks no
# credential a person typed, and its failures (a replayed token) are logged.
AUDITED: Mapping[str, Audited] = {
    "CreateUser": Audited(
        AuditEventType.ROLE_CHANGE, _user_in_response, note=_made_admin_at_creation, applies=_asks_for_admin
    ),
    "Authenticate": Audited(AuditEventType.SIGN_IN, _user_in_response, "on_failure", note=_second_factor),
    "VerifyCredentials": Audited(AuditEventType.CREDENTIALS_CHECK, _user_in_response, "on_failure"),
    "IssueServiceToken": Audited(AuditEventType.SERVICE_TOKEN_ISSUE, _id_in_request("client_id")),
    "ChangePassword": Audited(AuditEventType.PASSWORD_CHANGE, _USER_ID),
    "ResetPassword": Audited(AuditEventType.PASSWORD_RESET, _reset_token_user),
    "EnableMfa": Audited(AuditEventType.MFA_ENROLL, _USER_ID),
    "ConfirmMfa": Audited(AuditEventType.MFA_ENABLE, _USER_ID),
    "DisableMfa": Audited(AuditEventType.MFA_DISABLE, _USER_ID),
    "ResetUserMfa": Audited(AuditEventType.MFA_RESET, _USER_ID),
    "RegenerateRecoveryCodes": Audited(AuditEventType.RECOVERY_CODES_REGENERATE, _USER_ID),
    "ChangeEmail": Audited(AuditEventType.EMAIL_CHANGE_REQUEST, _USER_ID),
    "ConfirmEmailChange": Audited(AuditEventType.EMAIL_CHANGE_CONFIRM, _USER_ID),
    "SetUserEmail": Audited(AuditEventType.EMAIL_SET, _USER_ID),
    "SetUserRole": Audited(AuditEventType.ROLE_CHANGE, _USER_ID, note=_role_asked),
    "DeactivateUser": Audited(AuditEventType.USER_DEACTIVATE, _USER_ID),
    "ReactivateUser": Audited(AuditEventType.USER_REACTIVATE, _USER_ID),
    "LockUser": Audited(AuditEventType.USER_LOCK, _USER_ID),
    "UnlockUser": Audited(AuditEventType.USER_UNLOCK, _USER_ID),
    "DeleteUser": Audited(AuditEventType.USER_DELETE, _requested_user),
    "DeleteUserByIdentifier": Audited(AuditEventType.USER_DELETE, identifier="before"),
    # One event per call, with counts: a batch of 1000 makes one record, not 1000 (the users
    # themselves are in ListUsers, start_create_time the event's time); but each admin it made is
    # named by an event of its own.
    "ImportUsers": Audited(AuditEventType.USERS_IMPORT, note=_import_counts, granted_admins=_imported_admins),
    "CreateServiceAccount": Audited(AuditEventType.SERVICE_ACCOUNT_CREATE, _created_service_account),
    "DeleteServiceAccount": Audited(AuditEventType.SERVICE_ACCOUNT_DELETE, _id_in_request("client_id")),
    "CreateServiceAccountToken": Audited(
        AuditEventType.SERVICE_ACCOUNT_TOKEN_CREATE, _id_in_request("service_account_id"), note=_created_token
    ),
    "RevokeServiceAccountToken": Audited(
        AuditEventType.SERVICE_ACCOUNT_TOKEN_REVOKE, _id_in_request("service_account_id"), note=_token_named
    ),
    "RevokeAllSessions": Audited(AuditEventType.SESSIONS_REVOKE, _USER_ID),
    "UpdateUser": Audited(AuditEventType.PROFILE_UPDATE, _USER_ID, note=_fields_updated),
    "SetUserMetadata": Audited(AuditEventType.METADATA_SET, _USER_ID, note=_metadata_key),
    "DeleteUserMetadata": Audited(AuditEventType.METADATA_DELETE, _USER_ID, note=_metadata_key),
    "CreateGroup": Audited(AuditEventType.GROUP_CREATE, _created_group),
    "RenameGroup": Audited(AuditEventType.GROUP_RENAME, _id_in_request("group_id")),
    "DeleteGroup": Audited(AuditEventType.GROUP_DELETE, _id_in_request("group_id")),
    "AddGroupMember": Audited(AuditEventType.GROUP_MEMBER_ADD, _USER_ID, note=_group_named),
    "RemoveGroupMember": Audited(AuditEventType.GROUP_MEMBER_REMOVE, _USER_ID, note=_group_named),
    "StartPasskeyRegistration": Audited(AuditEventType.PASSKEY_REGISTRATION_START, _USER_ID),
    "FinishPasskeyRegistration": Audited(AuditEventType.PASSKEY_REGISTER, _USER_ID),
    "FinishPasskeySignIn": Audited(AuditEventType.PASSKEY_SIGN_IN, _user_in_response),
    "RenamePasskey": Audited(AuditEventType.PASSKEY_RENAME, _USER_ID),
    "RemovePasskey": Audited(AuditEventType.PASSKEY_REMOVE, _USER_ID),
    "RemoveUserPasskey": Audited(AuditEventType.PASSKEY_REMOVE, _USER_ID),
    "SetPassword": Audited(AuditEventType.PASSWORD_SET, _USER_ID, note=_change_required),
}

# The note of each admin an import made (an event of its own beside the import's counts).
ADMIN_GRANTED_ON_IMPORT = f"{_ADMIN_GRANTED}, imported"
