"""The ErrorInfo reasons the server sends are exactly those the contract lists (users.v1.ErrorReason)."""

from __future__ import annotations

import importlib
import pkgutil
from datetime import UTC, datetime

import pytest
from google.rpc import error_details_pb2

import users_grpc
from users.v1 import error_reason_pb2
from users_grpc.domain.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    PasswordBreached,
    PasswordChangeRequired,
    PasswordExpired,
    PasswordReused,
    UsersError,
)
from users_grpc.grpc_api.status import ERROR_DOMAIN, ERROR_REASON_PREFIX, to_rpc_status


def _every_error_class() -> set[type[UsersError]]:
    # Error classes live beside the services that raise them (service_accounts.py has one), so
    # every module is imported before the subclasses are walked.
    for module in pkgutil.walk_packages(users_grpc.__path__, prefix="users_grpc."):
        importlib.import_module(module.name)
    found: set[type[UsersError]] = set()
    pending = list(UsersError.__subclasses__())
    while pending:
        cls = pending.pop()
        found.add(cls)
        pending.extend(cls.__subclasses__())
    return found


def _listed_reasons() -> set[str]:
    names = set(error_reason_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
    assert all(name.startswith(ERROR_REASON_PREFIX) for name in names)
    return {name.removeprefix(ERROR_REASON_PREFIX) for name in names}


def test_every_reason_the_server_sends_is_listed_in_the_contract() -> None:
    classes = _every_error_class()
    assert len(classes) > 20, "the walk found too few error classes to be all of them"
    unlisted = {cls.__name__: cls.reason for cls in classes if cls.reason not in _listed_reasons()}
    assert unlisted == {}


def test_every_listed_reason_is_one_the_server_sends() -> None:
    # The list is the contract, not a wish list: a reason nothing sends is a stale entry.
    sent = {cls.reason for cls in _every_error_class()}
    assert _listed_reasons() - sent == set()


def test_an_error_class_with_an_unlisted_reason_fails_at_definition() -> None:
    with pytest.raises(TypeError, match="NOT_IN_THE_CONTRACT"):

        class _Unlisted(UsersError):
            reason = "NOT_IN_THE_CONTRACT"


_CLASSES = sorted(_every_error_class(), key=lambda cls: cls.__name__)
# The classes whose constructor needs arguments; every other one takes none.
_MADE_WITH_ARGUMENTS: dict[type[UsersError], UsersError] = {
    InvalidArgument: InvalidArgument([FieldViolation("username", "required")]),
    AlreadyExists: AlreadyExists("email"),
    PasswordBreached: PasswordBreached("password"),
    PasswordReused: PasswordReused("password", 5),
    PasswordChangeRequired: PasswordChangeRequired(user_id="a" * 24, token="t", expires_at=datetime.now(UTC)),
    PasswordExpired: PasswordExpired(user_id="a" * 24, token="t", expires_at=datetime.now(UTC)),
}


@pytest.mark.parametrize("cls", _CLASSES, ids=[cls.__name__ for cls in _CLASSES])
def test_the_status_of_each_error_carries_its_listed_reason_and_domain(cls: type[UsersError]) -> None:
    error = _MADE_WITH_ARGUMENTS.get(cls) or cls()
    status = to_rpc_status(error)
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert [(i.domain, i.reason) for i in infos] == [(ERROR_DOMAIN, cls.reason)]
    assert error_reason_pb2.ErrorReason.Value(ERROR_REASON_PREFIX + infos[0].reason) != 0
