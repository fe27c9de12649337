"""The SCIM filters identity providers send to find a user, and nothing else.

Okta, Entra ID, Google and JumpCloud look a user up before creating it with one of
``userName eq "..."``, ``externalId eq "..."``, ``emails[type eq "work"].value eq "..."`` or
``emails.value eq "..."``, sometimes two of them joined by ``and``. A full RFC 7644 filter
grammar would promise queries (``co``, ``sw``, ``or``, ``not``, ``gt``) that ListUsers cannot
answer from an index, so anything else is refused as ``invalidFilter``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from scim2_models import InvalidFilterException

# One comparison: an attribute path, "eq", and a JSON string (escaped quotes allowed).
_COMPARISON = re.compile(
    r"""\s*(?P<path>[A-Za-z][\w.:]*(?:\[\s*type\s+eq\s+"(?P<type>[^"]*)"\s*\](?:\.value)?)?)\s+eq\s+"""
    r"""(?P<value>"(?:[^"\\]|\\.)*")\s*""",
    re.IGNORECASE,
)
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)
_USER_NAME = "username"
_EXTERNAL_ID = "externalid"
_EMAIL_PATHS = ("emails.value", "emails[type eq]", "emails[type eq].value", "emails")
_CORE = "urn:ietf:params:scim:schemas:core:2.0:user:"
# Two comparisons of the longest values (an email of 254, an externalId of 256) fit several times.
# The filter is parsed before any call checks the bearer, on the loop every call shares, so its
# length is what bounds the work a stranger can ask for.
MAX_FILTER_LENGTH = 2048


@dataclass(frozen=True)
class UserLookup:
    """What a filter asks for: each set value must hold (``and``)."""

    user_name: str | None = None
    external_id: str | None = None
    email: str | None = None


def parse(text: str) -> UserLookup:
    """The lookup ``text`` asks for; InvalidFilterException for any other filter."""
    check_length(text)
    found: dict[str, str] = {}
    for part in _split_and(text):
        match = _COMPARISON.fullmatch(part)
        if match is None:
            raise InvalidFilterException(detail=f"unsupported filter: {text[:200]}")
        key = _key(match.group("path"), match.group("type"))
        value = _json_string(match.group("value"))
        if found.setdefault(key, value) != value:
            raise InvalidFilterException(detail=f"{key} compared with two values")
    return UserLookup(user_name=found.get("user_name"), external_id=found.get("external_id"), email=found.get("email"))


def check_length(text: str) -> None:
    if len(text) > MAX_FILTER_LENGTH:
        raise InvalidFilterException(detail=f"the filter is longer than {MAX_FILTER_LENGTH} characters")


def _split_and(text: str) -> list[str]:
    # "and" inside a quoted value must not split it: split only outside quotes.
    parts, start, quoted, escaped = [], 0, False, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted and (index == 0 or not text[index - 1].isspace()):
            # Only where a run of whitespace starts: matching at every space of a run was quadratic.
            match = _AND.match(text, index)
            if match is not None and index >= start:
                parts.append(text[start:index])
                start = match.end()
    parts.append(text[start:])
    return parts


def _key(path: str, email_type: str | None) -> str:
    lowered = path.lower().removeprefix(_CORE)
    if lowered == _USER_NAME:
        return "user_name"
    if lowered == _EXTERNAL_ID:
        return "external_id"
    normalized = re.sub(r"\[.*\]", "[type eq]", lowered)
    if normalized in _EMAIL_PATHS:
        return "email"
    raise InvalidFilterException(detail=f"filtering on {path} is not supported")


def _json_string(quoted: str) -> str:
    value = json.loads(quoted)
    assert isinstance(value, str)
    return value
