"""The audit trail: security events recorded as calls end, and listed for admins (ListAuditEvents).

Events are written by the call pipeline's audit step (:mod:`users_grpc.pipeline.audit`), from one
table of RPCs (:mod:`users_grpc.grpc_api.audit_interceptor`), after each call resolves. An event
is never a reason to fail the call it records: a failed write is logged (by event type and cause
only) and the call's own answer stands. The write comes after the
action, in a separate insert (FerretDB has no transactions): a crash between the two loses that
one event, and a call cancelled mid-way is recorded as CANCELLED, though its action may or may
not have taken effect.

Pages are keyset pages over (time, id), newest first: a page token names the last event of its
page, so events recorded meanwhile (newer) never shift later pages, and a page deep in the trail
costs what the first one costs. The token is bound to the filters it was made for.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from datetime import UTC, datetime, timedelta

from users_grpc.domain import rules
from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.model import AuditEvent, AuditFilter, AuditPosition, to_milliseconds
from users_grpc.domain.ports import AuditTrail
from users_grpc.services.paging import PageTokens

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
ACTOR_ID_MAX_LENGTH = 256
_ID_BYTES = 12
_TIME = struct.Struct(">q")  # milliseconds since the epoch, as BSON dates hold them
# A page token names the last event's time and id, bound to the list's filters.
_PAGES = PageTokens(position_bytes=_TIME.size + _ID_BYTES, list_name="users.v1.ListAuditEvents")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


class AuditLog:
    def __init__(self, *, trail: AuditTrail) -> None:
        self._trail = trail

    async def record(self, event: AuditEvent) -> None:
        """Store ``event``; never raises (see the module docstring)."""
        # BSON dates hold milliseconds: the time stored is the one page tokens name.
        try:
            await self._trail.add(dataclasses.replace(event, time=to_milliseconds(event.time)))
        except Exception as error:  # noqa: BLE001  # an audit write must never fail the call
            log.warning(
                "audit event not recorded",
                extra={"audit_type": event.type.value, "cause": type(error).__name__},
            )

    async def subject_of_identifier(self, identifier: str) -> str:
        """The id of the account a username or email names, or "" (the identifier itself is never
        kept: people type passwords into the username field)."""
        if not identifier.strip() or len(identifier) > rules.IDENTIFIER_MAX_LENGTH:
            return ""
        try:
            return await self._trail.find_user_id(rules.identifier_key(identifier)) or ""
        except Exception as error:  # noqa: BLE001  # as record: never fails the call
            log.warning("audit subject not resolved", extra={"cause": type(error).__name__})
            return ""

    async def list_events(self, filters: AuditFilter, page_size: int, page_token: str) -> tuple[list[AuditEvent], str]:
        """A page of events, newest first, and the token of the next page ("" after the last)."""
        _validate(filters, page_size)
        limit = page_size or DEFAULT_PAGE_SIZE
        before = _position(page_token, filters)
        events = await self._trail.list_events(filters, before, limit + 1)
        if len(events) <= limit:
            return events, ""
        last = events[limit - 1]
        return events[:limit], _page_token(AuditPosition(last.time, last.id), filters)


def _validate(filters: AuditFilter, page_size: int) -> None:
    violations: list[FieldViolation] = []
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        violations.append(FieldViolation("page_size", f"must be 0 to {MAX_PAGE_SIZE}"))
    if filters.subject_id and not rules.is_id(filters.subject_id):
        violations.append(FieldViolation("subject_id", "must be 24 lower-case hexadecimal digits"))
    if len(filters.actor_id) > ACTOR_ID_MAX_LENGTH or not filters.actor_id.isprintable():
        violations.append(FieldViolation("actor_id", f"must be at most {ACTOR_ID_MAX_LENGTH} printable characters"))
    if filters.start_time is not None and filters.end_time is not None and filters.start_time >= filters.end_time:
        violations.append(FieldViolation("end_time", "must be after start_time"))
    if violations:
        raise InvalidArgument(violations)


def _page_token(position: AuditPosition, filters: AuditFilter) -> str:
    payload = _TIME.pack((position.time - _EPOCH) // _MILLISECOND) + bytes.fromhex(position.id)
    return _PAGES.encode(payload, filters.fingerprint())


def _position(page_token: str, filters: AuditFilter) -> AuditPosition | None:
    payload = _PAGES.decode(page_token, filters.fingerprint())
    if payload is None:
        return None
    (milliseconds,) = _TIME.unpack(payload[: _TIME.size])
    try:
        moment = _EPOCH + milliseconds * _MILLISECOND
    except OverflowError:
        raise _PAGES.refusal() from None
    return AuditPosition(moment, payload[_TIME.size :].hex())
