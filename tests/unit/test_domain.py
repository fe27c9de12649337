"""The domain's small promises: etags, filter fingerprints, account states, codes and tokens."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.model import (
    AuditEventType,
    AuditFilter,
    Caller,
    Gender,
    Role,
    User,
    UserFilter,
    UserState,
    Version,
    parse_etag,
)
from users_grpc.domain.rules import (
    new_activation_code,
    new_activation_token,
    service_account_machine,
    validate_activation,
    validate_activation_code,
)

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
JANE = User(
    id="a" * 24,
    username="jane",
    first_name="Jane",
    last_name="Doe",
    email="jane@example.test",
    gender=Gender.FEMALE,
    role=Role.USER,
    state=UserState.ACTIVE,
    created_at=CREATED,
    updated_at=datetime(2026, 3, 4, 5, 6, 7, 891_234, tzinfo=UTC),
    revision=7,
)


# ETags (AIP-154): opaque to callers, read back by UpdateUser.


@pytest.mark.parametrize("revision", [0, 1, 7, 12345])
@pytest.mark.parametrize(
    "updated_at",
    [CREATED, datetime(2026, 3, 4, 5, 6, 7, 891_000, tzinfo=UTC), datetime(1999, 12, 31, 23, 59, 59, 1000, tzinfo=UTC)],
)
def test_an_etag_reads_back_as_the_revision_and_updated_at(revision: int, updated_at: datetime) -> None:
    user = dataclasses.replace(JANE, revision=revision, updated_at=updated_at)
    assert parse_etag(user.etag) == Version(revision, updated_at)


def test_every_etag_reads_back() -> None:
    """Whatever the length of its encoding (and so its padding)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for millis in (0, 1, 12, 123, 1234, 12345, 123456, 1234567):
        for revision in range(300):
            user = dataclasses.replace(JANE, revision=revision, updated_at=epoch + timedelta(milliseconds=millis))
            assert parse_etag(user.etag) == Version(revision, user.updated_at)


def test_an_etag_keeps_updated_at_to_the_millisecond() -> None:
    """As stored: BSON dates hold milliseconds."""
    assert parse_etag(JANE.etag).updated_at == datetime(2026, 3, 4, 5, 6, 7, 891_000, tzinfo=UTC)


def test_an_etag_changes_with_the_revision_and_with_updated_at() -> None:
    etags = {
        JANE.etag,
        dataclasses.replace(JANE, revision=8).etag,
        dataclasses.replace(JANE, updated_at=JANE.updated_at + timedelta(milliseconds=1)).etag,
    }
    assert len(etags) == 3


def test_an_etag_of_a_user_read_without_time_zone_is_the_same() -> None:
    """A client without tz_aware reads BSON dates naive; they are UTC."""
    naive = dataclasses.replace(JANE, updated_at=JANE.updated_at.replace(tzinfo=None))
    assert naive.etag == JANE.etag


def test_an_etag_is_safe_in_urls_and_headers() -> None:
    for revision in range(20):
        etag = dataclasses.replace(JANE, revision=revision).etag
        assert etag.isascii()
        assert all(char.isalnum() or char in "-_" for char in etag), etag


def _encoded(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "etag",
    [
        "",
        "!!!",
        "not an etag",
        _encoded("7"),
        _encoded("x:1"),
        _encoded("7:x"),
        _encoded("-1:0"),  # no revision is negative
        _encoded("07:0"),  # not the one spelling we make
        _encoded("7:1e3"),
        _encoded("7:99999999999999999999999"),  # beyond any date
        base64.urlsafe_b64encode(b"\xff\xfe:1").decode(),
        JANE.etag + "==",  # padded: not as we make it
        JANE.etag + "A",
    ],
)
def test_anything_but_an_etag_of_a_user_is_refused_on_etag(etag: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_etag(etag)
    assert list(error.value.violations) == [FieldViolation("etag", "is not an etag of a user")]


# Filter fingerprints: a page token is bound to the filters it was issued for.

T1 = datetime(2026, 1, 1, tzinfo=UTC)
T2 = datetime(2026, 2, 1, tzinfo=UTC)


def test_equal_user_filters_have_equal_fingerprints() -> None:
    assert UserFilter().fingerprint() == UserFilter().fingerprint()

    def full() -> UserFilter:
        return UserFilter(
            role=Role.ADMIN,
            state=UserState.LOCKED,
            mfa_enabled=True,
            prefix_key="ja",
            created_after=T1,
            created_before=T2,
        )

    assert full().fingerprint() == full().fingerprint()


def test_user_filters_that_differ_in_anything_have_different_fingerprints() -> None:
    filters = [
        UserFilter(),
        UserFilter(role=Role.USER),
        UserFilter(role=Role.ADMIN),
        UserFilter(state=UserState.ACTIVE),
        UserFilter(state=UserState.LOCKED),
        UserFilter(mfa_enabled=True),
        UserFilter(mfa_enabled=False),
        UserFilter(prefix_key="ja"),
        UserFilter(prefix_key="jan"),
        UserFilter(created_after=T1),
        UserFilter(created_after=T2),
        UserFilter(created_before=T1),
        UserFilter(created_after=T1, created_before=T2),
    ]
    assert len({f.fingerprint() for f in filters}) == len(filters)


def test_audit_filters_that_differ_in_anything_have_different_fingerprints() -> None:
    filters = [
        AuditFilter(),
        AuditFilter(subject_id="a" * 24),
        AuditFilter(actor_id="a" * 24),
        AuditFilter(types=frozenset({AuditEventType.SIGN_IN})),
        AuditFilter(types=frozenset({AuditEventType.SIGN_IN, AuditEventType.USER_LOCK})),
        AuditFilter(start_time=T1),
        AuditFilter(end_time=T1),
        AuditFilter(start_time=T1, end_time=T2),
    ]
    assert len({f.fingerprint() for f in filters}) == len(filters)
    same_types = frozenset({AuditEventType.USER_LOCK, AuditEventType.SIGN_IN})
    assert AuditFilter(types=same_types).fingerprint() == filters[4].fingerprint()


# Account states and callers


@pytest.mark.parametrize("state", list(UserState))
@pytest.mark.parametrize("role", list(Role))
def test_only_an_active_account_is_active_and_only_an_active_admin_counts_as_one(state: UserState, role: Role) -> None:
    user = dataclasses.replace(JANE, state=state, role=role)
    assert user.is_active is (state is UserState.ACTIVE)
    assert user.is_active_admin is (state is UserState.ACTIVE and role is Role.ADMIN)


def test_only_a_caller_with_the_admin_role_is_an_admin() -> None:
    assert Caller(user_id="a" * 24, role=Role.ADMIN).is_admin
    assert not Caller(user_id="a" * 24, role=Role.USER).is_admin
    assert not Caller(machine="billing").is_admin


def test_a_service_accounts_callers_are_logged_under_its_name() -> None:
    """As the proto and README say: "service-account:<name>", apart from mTLS identities."""
    assert service_account_machine("reporting") == "service-account:reporting"


# Codes and tokens mailed for activation


def test_activation_codes_are_six_digits_including_leading_zeros() -> None:
    codes = {new_activation_code() for _ in range(2000)}
    for code in codes:
        validate_activation_code(code)
    assert any(code.startswith("0") for code in codes)
    assert len(codes) > 1800  # drawn at random, not repeated


def test_an_activation_token_carries_256_random_bits_and_is_accepted() -> None:
    tokens = {new_activation_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert len(base64.urlsafe_b64decode(token + "=")) == 32
        validate_activation("", token)
