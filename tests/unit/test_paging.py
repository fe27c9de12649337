"""The one page-token codec keeps the tokens each list has always made, so a token handed out by a
replica of the code before it still pages on one after it."""

from __future__ import annotations

import base64
import hashlib

import pytest

from users_grpc.domain.errors import InvalidArgument
from users_grpc.services.paging import PageTokens

POSITION = bytes.fromhex("65f0a1b2c3d4e5f601234567")
FILTERS = b"role=admin"


def _unpadded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_a_filtered_lists_token_is_its_position_and_the_check_binding_it_to_the_filters() -> None:
    check = hashlib.sha256(b"users.v1.ListUsers\0" + FILTERS + b"\0" + POSITION).digest()[:12]
    tokens = PageTokens(position_bytes=12, list_name="users.v1.ListUsers")
    assert tokens.encode(POSITION, FILTERS) == _unpadded(POSITION + check)
    assert tokens.decode(_unpadded(POSITION + check), FILTERS) == POSITION


def test_an_unfiltered_lists_token_is_the_bare_position() -> None:
    tokens = PageTokens(position_bytes=12)
    assert tokens.encode(POSITION) == _unpadded(POSITION)
    assert tokens.decode(_unpadded(POSITION)) == POSITION


def test_the_first_page_has_no_token() -> None:
    assert PageTokens(position_bytes=12, list_name="users.v1.ListUsers").decode("", FILTERS) is None


@pytest.mark.parametrize(
    ("token_of", "message"),
    [
        (lambda good: good[:-2] + ("AA" if good[-2:] != "AA" else "BB"), "with these filters"),  # altered
        (lambda good: good + "==", "with these filters"),  # another spelling of the same bytes
        (lambda good: "!!" + good, "with these filters"),  # no base64 at all
    ],
)
def test_a_token_not_made_by_this_list_with_these_filters_is_invalid_argument(token_of, message) -> None:
    tokens = PageTokens(position_bytes=12, list_name="users.v1.ListUsers")
    with pytest.raises(InvalidArgument) as refused:
        tokens.decode(token_of(tokens.encode(POSITION, FILTERS)), FILTERS)
    assert [v.field for v in refused.value.violations] == ["page_token"]
    assert message in refused.value.violations[0].description


def test_a_token_made_for_other_filters_is_refused() -> None:
    tokens = PageTokens(position_bytes=12, list_name="users.v1.ListUsers")
    with pytest.raises(InvalidArgument):
        tokens.decode(tokens.encode(POSITION, FILTERS), b"role=user")
