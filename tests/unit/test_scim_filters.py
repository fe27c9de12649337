"""The SCIM filters the IdPs send, and the refusal of every other."""

from __future__ import annotations

import pytest
from scim2_models import InvalidFilterException

from users_grpc.scim.filters import UserLookup, parse


@pytest.mark.parametrize(
    ("text", "lookup"),
    [
        ('userName eq "jane"', UserLookup(user_name="jane")),
        ('USERNAME EQ "Jane"', UserLookup(user_name="Jane")),
        ('urn:ietf:params:scim:schemas:core:2.0:User:userName eq "j"', UserLookup(user_name="j")),
        ('externalId eq "00u1"', UserLookup(external_id="00u1")),
        ('emails[type eq "work"].value eq "a@b.example"', UserLookup(email="a@b.example")),
        ('emails.value eq "a@b.example"', UserLookup(email="a@b.example")),
        ('userName eq "a and b" and externalId eq "x"', UserLookup(user_name="a and b", external_id="x")),
        ('userName eq "say \\"hi\\""', UserLookup(user_name='say "hi"')),
    ],
)
def test_the_filters_idps_send_are_read(text: str, lookup: UserLookup) -> None:
    assert parse(text) == lookup


@pytest.mark.parametrize(
    "text",
    [
        'userName co "j"',
        'userName sw "j"',
        'userName eq "a" or userName eq "b"',
        'not (userName eq "a")',
        'title eq "x"',
        'userName eq "a" and userName eq "b"',
        "userName eq jane",
        "",
    ],
)
def test_any_other_filter_is_invalid(text: str) -> None:
    with pytest.raises(InvalidFilterException):
        parse(text)
