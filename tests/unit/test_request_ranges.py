"""The edge's range check (users_grpc/grpc_api/request_ranges.py), field by field over the whole contract:
every number of every request, at and past the ends of its range, without a server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from users.v1 import user_service_pb2 as pb
from users_grpc.domain.errors import InvalidArgument
from users_grpc.grpc_api.request_ranges import (
    NUMBER_RANGES,
    SERVICE,
    TIMESTAMP_MAX_SECONDS,
    TIMESTAMP_MIN_SECONDS,
    numeric_fields,
    refuse_out_of_range,
)

PROTO = Path(__file__).parents[2] / "protos" / "users" / "v1" / "user_service.proto"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def paths_to_numbers(
    descriptor: Descriptor, prefix: tuple[FieldDescriptor, ...] = ()
) -> list[tuple[FieldDescriptor, ...]]:
    found: list[tuple[FieldDescriptor, ...]] = []
    for field in descriptor.fields:
        path = (*prefix, field)
        if field in numeric_fields(descriptor):
            found.append(path)
        elif field.message_type is not None and field.message_type not in [f.message_type for f in prefix]:
            found += paths_to_numbers(field.message_type, path)
    return found


CASES = [(method.name, path) for method in SERVICE.methods for path in paths_to_numbers(method.input_type)]


def request_with(method_name: str, path: tuple[FieldDescriptor, ...], **values: Any) -> Any:
    request = message_factory.GetMessageClass(SERVICE.methods_by_name[method_name].input_type)()
    target = request
    for field in path[:-1]:
        target = getattr(target, field.name).add() if field.is_repeated else getattr(target, field.name)
    last = path[-1]
    if last.type == FieldDescriptor.TYPE_MESSAGE:
        moment = getattr(target, last.name).add() if last.is_repeated else getattr(target, last.name)
        moment.SetInParent()
        for name, number in values.items():
            setattr(moment, name, number)
    else:
        setattr(target, last.name, values["number"])
    return request


def dotted(path: tuple[FieldDescriptor, ...]) -> str:
    return ".".join(f"{f.name}[0]" if f.is_repeated and f is not path[-1] else f.name for f in path)


def refused_fields(request: Any) -> list[str]:
    with pytest.raises(InvalidArgument) as raised:
        refuse_out_of_range(request)
    return [violation.field for violation in raised.value.violations]


def test_the_contract_has_the_numbers_the_cases_cover() -> None:
    # The walk reaches nested messages (UpdateUserRequest.user) and finds all of them.
    assert {f"{name}.{dotted(path)}" for name, path in CASES} == {
        "ListServiceAccounts.page_size",
        "ListUsers.page_size",
        "ListUsers.start_create_time",
        "ListUsers.end_create_time",
        "UpdateUser.user.created_at",
        "UpdateUser.user.updated_at",
        "UpdateUser.user.metadata[0].update_time",
        "UpdateUser.user.password_update_time",
        "UpdateUser.user.create_time",
        "UpdateUser.user.update_time",
        "ListAuditEvents.page_size",
        "ListAuditEvents.start_time",
        "ListAuditEvents.end_time",
        "ListGroups.page_size",
        "ListGroupMembers.page_size",
        "ListUserGroups.page_size",
        "CreateServiceAccountToken.expire_time",
    }


@pytest.mark.parametrize(("method", "path"), CASES, ids=[f"{m}.{dotted(p)}" for m, p in CASES])
def test_each_number_is_served_in_its_range_and_refused_naming_it_past_either_end(
    method: str, path: tuple[FieldDescriptor, ...]
) -> None:
    field = path[-1]
    name = dotted(path)
    if field.type == FieldDescriptor.TYPE_MESSAGE:  # a Timestamp
        for seconds, nanos in [(TIMESTAMP_MIN_SECONDS, 0), (0, 0), (TIMESTAMP_MAX_SECONDS, 999_999_999)]:
            refuse_out_of_range(request_with(method, path, seconds=seconds, nanos=nanos))
        for seconds in (TIMESTAMP_MIN_SECONDS - 1, TIMESTAMP_MAX_SECONDS + 1, INT64_MIN, INT64_MAX, 2**40, -(2**40)):
            assert refused_fields(request_with(method, path, seconds=seconds)) == [name]
        for nanos in (-1, 1_000_000_000, 2_000_000_000, -(2**31), 2**31 - 1):
            assert refused_fields(request_with(method, path, nanos=nanos)) == [f"{name}.nanos"]
    else:
        low, high = NUMBER_RANGES[field.full_name]
        for number in (low, high):
            refuse_out_of_range(request_with(method, path, number=number))
        for number in (low - 1, high + 1, -(2**31), 2**31 - 1):
            assert refused_fields(request_with(method, path, number=number)) == [name]


def test_page_sizes_are_those_the_contract_states() -> None:
    # Each page_size's comment says "Default 50, at most 1000": the table must not drift from it.
    pattern = r"// Optional\. Default 50, at most (\d+)\.\n\s+int32 page_size"
    comments = [
        size for proto in sorted(PROTO.parent.glob("*.proto")) for size in re.findall(pattern, proto.read_text())
    ]
    page_sizes = {name: bounds for name, bounds in NUMBER_RANGES.items() if name.endswith(".page_size")}
    assert len(comments) == len(page_sizes) == 6
    assert set(comments) == {comments[0]}
    assert set(page_sizes.values()) == {(0, int(comments[0]))}


def test_every_out_of_range_field_is_named_at_once() -> None:
    request = pb.ListAuditEventsRequest(
        page_size=-1, start_time=Timestamp(nanos=-1), end_time=Timestamp(seconds=INT64_MAX)
    )
    assert refused_fields(request) == ["page_size", "start_time.nanos", "end_time"]


def test_durations_are_held_to_their_documented_range() -> None:
    # No request carries one yet; the check is ready for the first that does.
    for seconds, nanos in [(315_576_000_000, 999_999_999), (-315_576_000_000, -999_999_999), (1, 5), (-1, -5)]:
        refuse_out_of_range(duration_pb2.Duration(seconds=seconds, nanos=nanos))
    for seconds, nanos in [(315_576_000_001, 0), (-315_576_000_001, 0), (1, -1), (-1, 1), (0, 1_000_000_000)]:
        assert len(refused_fields(duration_pb2.Duration(seconds=seconds, nanos=nanos))) == 1


def test_what_is_no_message_and_an_empty_request_pass() -> None:
    refuse_out_of_range(object())
    for method in SERVICE.methods:
        refuse_out_of_range(message_factory.GetMessageClass(method.input_type)())
