"""The breached-password check against a Have I Been Pwned style range API (k-anonymity).

Only the first five hex digits of the password's SHA-1 leave the process: the API answers every
suffix it holds under that prefix, as ``SUFFIX:COUNT`` lines, and the match is made here. With
``Add-Padding: true`` the answer also holds made-up suffixes of count 0, so that its size tells an
observer nothing about the prefix; those never count as breached. The URL is a setting, so a
self-hosted mirror (the same format) works.

The stdlib's HTTP client, in a thread: one GET of a few kilobytes per chosen password does not
call for a new dependency (httpx is none of ours). The whole request is bounded by the timeout;
a thread still reading past it ends at the socket timeout, the same bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import urllib.error
import urllib.request

from users_grpc.domain.ports import BreachCheckFailed

_PREFIX_LENGTH = 5
_LINE = re.compile(r"([0-9A-F]{35}):([0-9]+)")
# Far above a real answer (about 1,000 suffixes of 40 bytes, padded to at most 1,000 more).
_MAX_RESPONSE_BYTES = 1 << 20


class PwnedPasswordsRange:
    """:class:`~users_grpc.domain.ports.BreachedPasswords` over a range API at ``url`` (the prefix is appended)."""

    def __init__(self, *, url: str, timeout_seconds: float, user_agent: str = "users-grpc") -> None:
        self._url = url
        self._timeout = timeout_seconds
        self._user_agent = user_agent

    async def is_breached(self, password: str) -> bool:
        digest = hashlib.sha1(password.encode(), usedforsecurity=False).hexdigest().upper()
        prefix, suffix = digest[:_PREFIX_LENGTH], digest[_PREFIX_LENGTH:]
        try:
            body = await asyncio.wait_for(asyncio.to_thread(self._range, prefix), self._timeout)
        except TimeoutError:
            raise BreachCheckFailed(f"no answer within {self._timeout} s") from None
        return _count_of(suffix, body) > 0

    def _range(self, prefix: str) -> str:
        request = urllib.request.Request(  # noqa: S310  # the URL's scheme is checked in config.py
            self._url + prefix, headers={"Add-Padding": "true", "User-Agent": self._user_agent}
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                data: bytes = response.read(_MAX_RESPONSE_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise BreachCheckFailed(type(error).__name__) from None
        if len(data) > _MAX_RESPONSE_BYTES:
            raise BreachCheckFailed("answer too large")
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            raise BreachCheckFailed("answer not in the range format") from None


def _count_of(suffix: str, body: str) -> int:
    """The count the answer gives ``suffix`` (0 when absent, or a padding entry); BreachCheckFailed
    when a line is not of the range format, so that a wrong URL (an HTML page, say) never passes
    for "not breached"."""
    count = 0
    for line in body.splitlines():
        if not line.strip():
            continue
        match = _LINE.fullmatch(line.strip())
        if match is None:
            raise BreachCheckFailed("answer not in the range format")
        if match.group(1) == suffix:
            count = int(match.group(2))
    return count
