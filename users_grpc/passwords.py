"""Password hashing with bcrypt, off the event loop in a bounded thread pool."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from concurrent.futures import Executor

import bcrypt

from users_grpc.domain import normalize_password

# Keys the pre-hash when no pepper is configured. It is a domain separator, not
# a secret: it keeps our digests out of any precomputed list of plain SHA-384s.
_DEFAULT_PEPPER = b"users-grpc/password/v1"


class BcryptHasher:
    """bcrypt over base64(HMAC-SHA384(pepper, password)).

    bcrypt reads only 72 bytes and bcrypt 5 raises beyond them. The 64-byte
    base64 pre-hash lets every password of up to 128 characters count in full,
    with no NUL bytes and no plain-SHA "hash shucking". Changing the pepper
    invalidates every stored hash. The password is normalized (NFC) first, as
    every length check measures it, so one password has one hash however it
    was typed.
    """

    def __init__(self, *, rounds: int, executor: Executor, pepper: str | None = None) -> None:
        self._rounds = rounds
        self._executor = executor
        self._pepper = pepper.encode() if pepper else _DEFAULT_PEPPER
        # Checked against when an account is missing, so that costs a real bcrypt run.
        self._dummy_hash = bcrypt.hashpw(self._prehash("not a password"), bcrypt.gensalt(rounds))

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        salt = bcrypt.gensalt(self._rounds)
        hashed = await loop.run_in_executor(self._executor, bcrypt.hashpw, self._prehash(password), salt)
        return hashed.decode("ascii")

    async def verify(self, password: str, password_hash: str | None) -> bool:
        loop = asyncio.get_running_loop()
        expected = self._dummy_hash if password_hash is None else password_hash.encode("ascii")
        matches = await loop.run_in_executor(self._executor, bcrypt.checkpw, self._prehash(password), expected)
        return matches and password_hash is not None

    def _prehash(self, password: str) -> bytes:
        digest = hmac.new(self._pepper, normalize_password(password).encode("utf-8"), hashlib.sha384).digest()
        return base64.b64encode(digest)


def common_passwords(min_length: int) -> frozenset[str]:
    """The common passwords a new password may not be: zxcvbn's list of the 30,000 most used.

    Only those long enough to pass the length rule matter; the list is lower-case.
    """
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # a large module: loaded only here

    return frozenset(password for password in FREQUENCY_LISTS["passwords"] if len(password) >= min_length)
