"""Records the audit trail from one place: a server interceptor, driven by one table of RPCs.

Installed inside :class:`~users_grpc.grpc_api.interceptors.UserServiceInterceptor`, so it sees only calls
that the access rules admitted (the caller is known, with its source address) and the outcome
the service gave: the response, or the domain error before it becomes a status. Calls refused
before they reach the service (no or a bad credential, a rule that does not admit the caller, the
per-address rate limit, a malformed request) are logged by that interceptor and not audited, so
an anonymous flood cannot turn into a flood of audit writes.

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

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import grpc

from users.v1 import metadata_pb2, user_pb2
from users_grpc.domain import model, rules
from users_grpc.domain.budget import database_budget
from users_grpc.domain.errors import InvalidArgument, UsersError
from users_grpc.domain.metadata import validate_key
from users_grpc.domain.model import ActorKind, AuditActor, AuditEvent, AuditEventType, Caller
from users_grpc.domain.ports import Clock
from users_grpc.grpc_api.access import current_caller
from users_grpc.grpc_api.convert import requested_user_id
from users_grpc.grpc_api.status import to_rpc_status
from users_grpc.services.audit import AuditLog

log = logging.getLogger(__name__)

_Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
_Part = Callable[[Any, Any], str]  # (request, response or None on failure) -> text

_OK = grpc.StatusCode.OK.value[0]
_ADMIN_GRANTED = f"role {user_pb2.Role.Name(user_pb2.ROLE_ADMIN)}"
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]


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


def _reset_token_user(request: Any, _response: Any) -> str:
    # A reset token is "<user id>.<secret>": the id part names the user and is no secret; the
    # rest is never read here.
    user_id = str(request.token).partition(".")[0]
    return user_id if rules.is_id(user_id) else ""


def _second_factor(request: Any, _response: Any) -> str:
    # Which kind of proof, never the proof: a passkey's second step reads "passkey".
    return "passkey" if request.passkey_ceremony_id else ""


def _no_subject(_request: Any, _response: Any) -> str:
    return ""


def _role_asked(request: Any, _response: Any) -> str:
    known = request.role in user_pb2.Role.values()
    return f"role {user_pb2.Role.Name(request.role)}" if known else f"role {int(request.role)}"


def _asks_for_admin(request: Any) -> bool:
    return bool(request.role == user_pb2.ROLE_ADMIN)


def _every_call(_request: Any) -> bool:
    return True


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


@dataclass(frozen=True)
class Audited:
    type: AuditEventType
    subject: _Part = _no_subject
    # Where the request names the subject only by username or email, the account's id is looked
    # up: "before" the call (a deletion removes it), or after a failed sign-in ("on_failure";
    # a successful one answers with the user).
    identifier: Literal["", "before", "on_failure"] = ""
    note: _Part | None = None
    # Whether a call is recorded at all (CreateUser only when it asks for ROLE_ADMIN: anyone may
    # register, and a registration is no security event).
    applies: Callable[[Any], bool] = _every_call
    # The users the call made admins, each recorded as a ROLE_CHANGE event of its own.
    granted_admins: Callable[[Any, Any], list[str]] | None = None


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
    # themselves are in ListUsers, created_after the event's time); but each admin it made is
    # named by an event of its own.
    "ImportUsers": Audited(AuditEventType.USERS_IMPORT, note=_import_counts, granted_admins=_imported_admins),
    "CreateServiceAccount": Audited(AuditEventType.SERVICE_ACCOUNT_CREATE, _created_service_account),
    "DeleteServiceAccount": Audited(AuditEventType.SERVICE_ACCOUNT_DELETE, _id_in_request("client_id")),
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


def actor_of(caller: Caller) -> AuditActor:
    if caller.user_id is not None:
        return AuditActor(kind=ActorKind.USER, id=caller.user_id, source=caller.source)
    if caller.service_account_id is not None:
        return AuditActor(kind=ActorKind.SERVICE_ACCOUNT, id=caller.service_account_id, source=caller.source)
    if caller.machine is not None:
        return AuditActor(kind=ActorKind.MACHINE, id=caller.machine, source=caller.source)
    return AuditActor(kind=ActorKind.ANONYMOUS, id="", source=caller.source)


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Writes one audit event for each call of an RPC in :data:`AUDITED`, after the call resolves.

    Install it after (inside) the access interceptor, which sets :data:`current_caller`.
    """

    def __init__(self, *, method_prefix: str, audit: AuditLog, clock: Clock) -> None:
        self._method_prefix = method_prefix
        self._audit = audit
        self._clock = clock
        # Records run as tasks of their own (see _detach); held here so they are not collected mid-way.
        self._detached: set[asyncio.Task[None]] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(self._method_prefix):
            return handler
        entry = AUDITED.get(method[len(self._method_prefix) :])
        if entry is None:
            return handler
        # An aio server's handlers are coroutine functions, whatever the sync-typed stubs say.
        behavior = cast(_Behavior, handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(
            self._audited(entry, behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _audited(self, entry: Audited, behavior: _Behavior) -> _Behavior:
        async def audited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not entry.applies(request):
                return await behavior(request, context)
            known = await self._audit.subject_of_identifier(request.identifier) if entry.identifier == "before" else ""
            try:
                response = await behavior(request, context)
            except UsersError as error:
                await asyncio.shield(self._detach(entry, request, None, known, to_rpc_status(error).code, error.reason))
                raise
            except asyncio.CancelledError:
                # The action may or may not have happened: say so, without holding up the cancellation.
                self._detach(entry, request, None, known, _CANCELLED, "", "call cancelled: outcome unknown")
                raise
            except Exception:
                await asyncio.shield(self._detach(entry, request, None, known, _INTERNAL, "INTERNAL"))
                raise
            await asyncio.shield(self._detach(entry, request, response, known, _OK, ""))
            return response

        return audited

    def _detach(self, *record: Any) -> asyncio.Task[None]:
        """The record of a call as a task of its own, which the call awaits shielded: a caller who
        stops waiting (a deadline, a cancellation) cancels its call, not the record of what it did,
        nor a database operation half-way (PyMongo leaks a connection cancelled mid-connect)."""
        task = asyncio.create_task(self._record(*record))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        return task

    async def _record(
        self,
        entry: Audited,
        request: Any,
        response: Any,
        known_subject: str,
        status_code: int,
        error_reason: str,
        note: str = "",
    ) -> None:
        # Its own database time, not what is left of the call's deadline: an action that took
        # effect is recorded even if the caller stopped waiting.
        budget = database_budget.get()
        token = database_budget.set(None if budget is None else dataclasses.replace(budget, deadline=None))
        try:
            await self._write(entry, request, response, known_subject, status_code, error_reason, note)
        except Exception as error:  # noqa: BLE001  # an audit write must never fail the call
            log.warning(
                "audit event not recorded", extra={"audit_type": entry.type.value, "cause": type(error).__name__}
            )
        finally:
            database_budget.reset(token)

    async def _write(
        self,
        entry: Audited,
        request: Any,
        response: Any,
        known_subject: str,
        status_code: int,
        error_reason: str,
        note: str,
    ) -> None:
        subject = entry.subject(request, response) or known_subject
        if not subject and response is None and entry.identifier == "on_failure":
            subject = await self._audit.subject_of_identifier(request.identifier)
        event = AuditEvent(
            type=entry.type,
            time=self._clock.now(),
            actor=actor_of(current_caller.get()),
            subject_id=subject,
            status_code=status_code,
            error_reason=error_reason,
            reason=note or (entry.note(request, response) if entry.note else ""),
        )
        await self._audit.record(event)
        for admin_id in entry.granted_admins(request, response) if entry.granted_admins else ():
            grant = AuditEvent(
                type=AuditEventType.ROLE_CHANGE,
                time=event.time,
                actor=event.actor,
                subject_id=admin_id,
                status_code=_OK,
                error_reason="",
                reason=f"{_ADMIN_GRANTED}, imported",
            )
            await self._audit.record(grant)
