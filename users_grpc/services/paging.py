"""Page tokens: the one codec of every paged list (ListUsers, ListServiceAccounts, ListAuditEvents).

A token is the position the next page starts after (the last item's key, as bytes), in unpadded
URL-safe base64: opaque to callers, and as cheap to follow deep in a list as on its first page.
A list with filters binds its tokens to them with a check (the first bytes of a SHA-256 over the
list's name, the filters' fingerprint and the position), which also catches a token altered in
transit or by hand; decoding re-encodes, so other spellings of the same bytes are refused too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from users_grpc.domain import base64url
from users_grpc.domain.errors import FieldViolation, InvalidArgument

_CHECK_BYTES = 12


@dataclass(frozen=True)
class PageTokens:
    """The tokens of one list, whose positions are ``position_bytes`` long.

    With a ``list_name`` (``users.v1.ListUsers``) each token carries the check that binds it to
    the list and the filters it was made for; without one it is the bare position (a list with no
    filters, whose tokens have always been so).
    """

    position_bytes: int
    list_name: str | None = None

    def encode(self, position: bytes, filters: bytes = b"") -> str:
        """The token of the page after ``position``, for the filters of fingerprint ``filters``."""
        return base64url.encode(position + self._check(position, filters))

    def decode(self, token: str, filters: bytes = b"") -> bytes | None:
        """The position ``token`` names, None for the first page (""); INVALID_ARGUMENT for a token
        that is not one of this list's with these filters."""
        if not token:
            return None
        try:
            raw = base64url.decode(token)
        except ValueError:
            raw = b""
        position, check = raw[: self.position_bytes], raw[self.position_bytes :]
        if (
            len(position) != self.position_bytes
            or check != self._check(position, filters)
            or self.encode(position, filters) != token
        ):
            raise self.refusal()
        return position

    def refusal(self) -> InvalidArgument:
        """What a caller hears for a token that is not one of this list's."""
        what = "is not a page token of this list" + (" with these filters" if self.list_name is not None else "")
        return InvalidArgument([FieldViolation("page_token", what)])

    def _check(self, position: bytes, filters: bytes) -> bytes:
        if self.list_name is None:
            return b""
        # Binds the token to its filters, and catches a token altered in transit or by hand.
        return hashlib.sha256(self.list_name.encode() + b"\0" + filters + b"\0" + position).digest()[:_CHECK_BYTES]
