"""The access rules' pure parts: reading the bearer token and admitting callers."""

from __future__ import annotations

import pytest

from users_grpc.access import Rule, _admits, bearer_token, source_address
from users_grpc.domain import Caller, Role

ALICE = Caller(user_id="a" * 24, role=Role.USER)
ADMIN = Caller(user_id="b" * 24, role=Role.ADMIN)
BILLING = Caller(machine="billing-service")


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([], None),
        ([("x-request-id", "1")], None),
        ([("authorization", "Bearer abc.def.ghi")], "abc.def.ghi"),
        ([("authorization", "bearer  abc ")], "abc"),
        ([("authorization", "Basic dXNlcjpwYXNz")], ""),  # present but not a bearer token: refused, not ignored
        ([("authorization", "Bearer")], ""),
    ],
)
def test_bearer_token(metadata: list[tuple[str, str]], token: str | None) -> None:
    assert bearer_token(metadata) == token


@pytest.mark.parametrize(
    ("rule", "caller", "admitted"),
    [
        (Rule.SELF, ALICE, True),
        (Rule.SELF, ADMIN, False),
        (Rule.SELF, BILLING, False),
        (Rule.SELF_OR_ADMIN, ADMIN, True),
        (Rule.SELF_OR_ADMIN, BILLING, False),
        (Rule.SELF_ADMIN_OR_MACHINE, BILLING, True),
        (Rule.ADMIN_OR_MACHINE, ALICE, False),
        (Rule.ADMIN, BILLING, False),
        (Rule.ADMIN, ADMIN, True),
    ],
)
def test_rules_about_alices_record(rule: Rule, caller: Caller, admitted: bool) -> None:
    assert _admits(rule, caller, subject=ALICE.user_id) is admitted


def test_self_needs_the_request_to_name_the_caller() -> None:
    assert not _admits(Rule.SELF_OR_ADMIN, ALICE, subject="c" * 24)
    assert not _admits(Rule.SELF, ALICE, subject=None)


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "machine", "source"),
    [
        ("ipv4:127.0.0.2:50123", None, False, "127.0.0.2"),
        ("ipv6:[::1]:50123", None, False, "::/64"),
        ("ipv6:[2001:db8:1:2:aaaa::5]:50123", None, False, "2001:db8:1:2::/64"),  # one /64, one source
        ("ipv6:[::ffff:192.0.2.7]:50123", None, False, "192.0.2.7"),
        ("ipv4:10.0.0.5:1", "2001:db8:1:2:bbbb::9", True, "2001:db8:1:2::/64"),
        ("ipv4:10.0.0.5:1", "203.0.113.9", False, "10.0.0.5"),  # only machine callers may name another address
        ("ipv4:10.0.0.5:1", "203.0.113.9, 10.0.0.7", True, "203.0.113.9"),
        ("ipv4:10.0.0.5:1", " ", True, "10.0.0.5"),
        ("unix:/tmp/socket", None, False, "unix:/tmp/socket"),
    ],
)
def test_source_address(peer: str, forwarded_for: str | None, machine: bool, source: str) -> None:
    assert source_address(peer, forwarded_for, machine=machine) == source
