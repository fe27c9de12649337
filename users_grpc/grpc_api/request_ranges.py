"""The ranges of every number a UserService request carries, checked once, at the edge.

Protobuf lets a caller send any int32, and any int64 pair as a Timestamp; past the edge such
values overflow ``datetime`` or BSON's 8-byte integers and would end as INTERNAL with a
traceback. The call pipeline's guard calls :func:`refuse_out_of_range` on every request that
parsed, before anything reads it, so the services only ever see values in range.

Timestamps and Durations are checked wherever they occur (their ranges are the ones
google/protobuf/timestamp.proto and duration.proto document). Every other integer field of a
request must be listed in :data:`NUMBER_RANGES`: a request type with an unlisted one fails at
import, so a new field cannot be forgotten. Enum fields are not numbers here: proto3 enums are
open, and each use refuses a number it does not know with its own field path (per item, in
ImportUsers).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from users.v1 import user_service_pb2
from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.services import audit, directory, groups, service_accounts

SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]

# 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z, as timestamp.proto says.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
# About 10,000 years either way, as duration.proto says.
DURATION_MAX_SECONDS = 315_576_000_000
NANOS_MAX = 999_999_999

_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"

# Each integer field of a request (full name) and its inclusive range; 0 is the default where allowed.
NUMBER_RANGES: dict[str, tuple[int, int]] = {
    "users.v1.ListUsersRequest.page_size": (0, directory.MAX_PAGE_SIZE),
    "users.v1.ListAuditEventsRequest.page_size": (0, audit.MAX_PAGE_SIZE),
    "users.v1.ListServiceAccountsRequest.page_size": (0, service_accounts.MAX_PAGE_SIZE),
    "users.v1.ListGroupsRequest.page_size": (0, groups.MAX_PAGE_SIZE),
    "users.v1.ListGroupMembersRequest.page_size": (0, groups.MAX_PAGE_SIZE),
    "users.v1.ListUserGroupsRequest.page_size": (0, groups.MAX_PAGE_SIZE),
}

_NUMBER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_DOUBLE,
    }
)


def refuse_out_of_range(request: object) -> None:
    """INVALID_ARGUMENT naming each field of ``request`` whose number is out of its range."""
    if isinstance(request, Message):
        violations = list(_violations(request, ""))
        if violations:
            raise InvalidArgument(violations)


def _violations(message: Message, prefix: str) -> list[FieldViolation]:
    name = message.DESCRIPTOR.full_name
    if name == _TIMESTAMP:
        return _timestamp_violations(message, prefix.rstrip("."))
    if name == _DURATION:
        return _duration_violations(message, prefix.rstrip("."))
    found: list[FieldViolation] = []
    # ListFields: only what was sent (a default 0 is always in range), and no recursion into unset messages.
    for field, value in message.ListFields():
        path = prefix + field.name
        values = list(value) if field.is_repeated else [value]
        for index, item in enumerate(values):
            item_path = f"{path}[{index}]" if field.is_repeated else path
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                found += _violations(item, item_path + ".")
            elif field.full_name in NUMBER_RANGES:
                low, high = NUMBER_RANGES[field.full_name]
                if not low <= item <= high:
                    found.append(FieldViolation(item_path, f"must be {low} to {high}"))
    return found


def _timestamp_violations(timestamp: Message, path: str) -> list[FieldViolation]:
    seconds, nanos = getattr(timestamp, "seconds"), getattr(timestamp, "nanos")  # noqa: B009 - any Message
    if not TIMESTAMP_MIN_SECONDS <= seconds <= TIMESTAMP_MAX_SECONDS:
        return [FieldViolation(path, "must be from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z")]
    if not 0 <= nanos <= NANOS_MAX:
        return [FieldViolation(f"{path}.nanos", f"must be 0 to {NANOS_MAX}")]
    return []


def _duration_violations(duration: Message, path: str) -> list[FieldViolation]:
    seconds, nanos = getattr(duration, "seconds"), getattr(duration, "nanos")  # noqa: B009 - any Message
    if not -DURATION_MAX_SECONDS <= seconds <= DURATION_MAX_SECONDS:
        return [FieldViolation(path, f"must be within {DURATION_MAX_SECONDS} seconds either way")]
    if not -NANOS_MAX <= nanos <= NANOS_MAX or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        return [FieldViolation(f"{path}.nanos", f"must be -{NANOS_MAX} to {NANOS_MAX}, of the sign of seconds")]
    return []


def numeric_fields(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> list[FieldDescriptor]:
    """Every integer, floating-point, Timestamp and Duration field reachable from ``descriptor``
    (enum fields excluded, see the module's comment)."""
    found: list[FieldDescriptor] = []
    for field in descriptor.fields:
        nested = field.message_type
        if nested is not None:
            if nested.full_name in {_TIMESTAMP, _DURATION}:
                found.append(field)
            elif nested.full_name not in seen:
                found += numeric_fields(nested, seen | {descriptor.full_name, nested.full_name})
        elif field.type in _NUMBER_TYPES:
            found.append(field)
    return found


def _unlisted_numbers() -> list[str]:
    return sorted(
        {
            field.full_name
            for method in SERVICE.methods
            for field in numeric_fields(method.input_type)
            if field.type != FieldDescriptor.TYPE_MESSAGE and field.full_name not in NUMBER_RANGES
        }
    )


# As domain/errors.py does for reasons: a request number without a range fails at import, not in production.
if _unlisted := _unlisted_numbers():
    raise TypeError(f"request number fields without a range in NUMBER_RANGES: {', '.join(_unlisted)}")
