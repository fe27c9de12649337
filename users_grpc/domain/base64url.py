"""Unpadded base64url (RFC 4648, section 5, without "="): the text of every token, cursor, page
token and etag the service makes, and of JWT parts."""

from __future__ import annotations

import base64


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode(text: str) -> bytes:
    """The bytes of ``text``; ValueError (binascii.Error is one) if it is no base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
