"""The audit step: one audit event for each call of an RPC in the audit table
(grpc_api/audit_interceptor.py's AUDITED), after the call resolves.

It runs inside the guard, so it sees only calls that the access rules admitted (the caller is
known, with its source address) and the outcome the service gave: the response, or the domain
error before it becomes a status. Calls refused before they reach the service are logged by the
guard and not audited, so an anonymous flood cannot turn into a flood of audit writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from users_grpc.domain.budget import database_budget
from users_grpc.domain.errors import UsersError
from users_grpc.domain.model import ActorKind, AuditActor, AuditEvent, AuditEventType, Caller
from users_grpc.domain.ports import Clock
from users_grpc.pipeline.call import Call, Code
from users_grpc.pipeline.current import current_caller
from users_grpc.services.audit import AuditLog

log = logging.getLogger("users_grpc.grpc_api.audit_interceptor")  # the name operators' log filters know

_Part = Callable[[Any, Any], str]  # (request, response or None on failure) -> text


def _no_subject(_request: Any, _response: Any) -> str:
    return ""


def _every_call(_request: Any) -> bool:
    return True


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


def actor_of(caller: Caller) -> AuditActor:
    if caller.user_id is not None:
        return AuditActor(kind=ActorKind.USER, id=caller.user_id, source=caller.source)
    if caller.service_account_id is not None:
        return AuditActor(kind=ActorKind.SERVICE_ACCOUNT, id=caller.service_account_id, source=caller.source)
    if caller.machine is not None:
        return AuditActor(kind=ActorKind.MACHINE, id=caller.machine, source=caller.source)
    return AuditActor(kind=ActorKind.ANONYMOUS, id="", source=caller.source)


class AuditTrail:
    """Records the audited calls of ``table`` (bare RPC name -> :class:`Audited`); each admin a
    call made (``granted_admins``) is a ROLE_CHANGE event of its own, noted ``grant_reason``."""

    def __init__(
        self,
        *,
        table: Mapping[str, Audited],
        grant_reason: str,
        audit: AuditLog,
        clock: Clock,
        status_of: Callable[[UsersError], Code],
    ) -> None:
        self._table = table
        self._grant_reason = grant_reason
        self._audit = audit
        self._clock = clock
        self._status_of = status_of
        # Records run as tasks of their own (see _detach); held here so they are not collected mid-way.
        self._detached: set[asyncio.Task[None]] = set()

    async def audited(self, call: Call, proceed: Callable[[], Awaitable[Any]]) -> Any:
        """``proceed()``'s response, recorded if the table says so."""
        entry = self._table.get(call.name)
        request: Any = call.request
        if entry is None or not entry.applies(request):
            return await proceed()
        known = await self._audit.subject_of_identifier(request.identifier) if entry.identifier == "before" else ""
        try:
            response = await proceed()
        except UsersError as error:
            await asyncio.shield(self._detach(entry, request, None, known, self._status_of(error), error.reason))
            raise
        except asyncio.CancelledError:
            # The action may or may not have happened: say so, without holding up the cancellation.
            self._detach(entry, request, None, known, Code.CANCELLED, "", "call cancelled: outcome unknown")
            raise
        except Exception:
            await asyncio.shield(self._detach(entry, request, None, known, Code.INTERNAL, "INTERNAL"))
            raise
        await asyncio.shield(self._detach(entry, request, response, known, Code.OK, ""))
        return response

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
        status_code: Code,
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
        status_code: Code,
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
            status_code=int(status_code),
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
                status_code=int(Code.OK),
                error_reason="",
                reason=self._grant_reason,
            )
            await self._audit.record(grant)
