"""Password hashing with bcrypt, off the event loop in a bounded thread pool behind a bounded queue."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import timedelta
from typing import TypeVar

import bcrypt

from users_grpc.domain.errors import Overloaded
from users_grpc.domain.model import PasswordScheme
from users_grpc.domain.rules import normalize_password

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# Keys the pre-hash when no pepper is configured. It is a domain separator, not
# a secret: it keeps our digests out of any precomputed list of plain SHA-384s.
_DEFAULT_PEPPER = b"users-grpc/password/v1"

# How much less CPU priority a hashing thread has than the threads answering calls (Linux nice
# levels: at +10 the scheduler gives a thread about a tenth of the share of one at +0).
HASHING_NICENESS = 10


def yield_to_calls() -> None:
    """Initializer of the hashing threads: a lower CPU priority for the calling thread alone.

    bcrypt is meant to be slow, and while it keeps every core busy a cheap call waits for a
    core whenever its turn comes. At a lower priority the hashes still take every core that is
    idle, so sign-ins lose nothing on their own, but the event loop and the database are
    served first. Linux sets a nice level per thread (elsewhere the call would renice the whole
    process, so nothing is done); raising one's own nice level needs no privilege.
    """
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + HASHING_NICENESS, 19))


class BcryptHasher:
    """bcrypt over base64(HMAC-SHA384(pepper, password)).

    bcrypt reads only 72 bytes and bcrypt 5 raises beyond them. The 64-byte
    base64 pre-hash lets every password of up to 128 characters count in full,
    with no NUL bytes and no plain-SHA "hash shucking". Changing the pepper
    invalidates every stored hash. The password is normalized (NFC) first, as
    every length check measures it, so one password has one hash however it
    was typed.
    """

    def __init__(
        self,
        *,
        rounds: int,
        executor: Executor,
        workers: int,
        queue_length: int,
        pepper: str | None = None,
        waited: Callable[[float], None] | None = None,
    ) -> None:
        self._rounds = rounds
        # Told how long each job waited for a worker (the metrics), if anything listens.
        self._waited = waited
        self._executor = executor
        self._pepper = pepper.encode() if pepper else _DEFAULT_PEPPER
        # Jobs running or waiting for a worker. Past the cap a call is refused at once: waiting
        # longer would only turn a flood into timeouts for everyone (and database deadlines spent in line).
        self._capacity = workers + queue_length
        self._workers = workers
        self._in_line = 0
        self._lock = threading.Lock()
        # Checked against when an account is missing, so that costs a real bcrypt run.
        self._dummy_hash = bcrypt.hashpw(self._prehash("not a password"), bcrypt.gensalt(rounds))

    async def hash(self, password: str) -> str:
        salt = bcrypt.gensalt(self._rounds)
        hashed = await self._run(bcrypt.hashpw, self._prehash(password), salt)
        return hashed.decode("ascii")

    async def verify(
        self, password: str, password_hash: str | None, scheme: PasswordScheme = PasswordScheme.PEPPERED
    ) -> bool:
        if scheme is PasswordScheme.BCRYPT and password_hash is not None:
            return await self._verify_plain(password, password_hash)
        usable = password_hash is not None and scheme is PasswordScheme.PEPPERED
        expected = password_hash.encode("ascii") if usable and password_hash is not None else self._dummy_hash
        matches = await self._run(bcrypt.checkpw, self._prehash(password), expected)
        return matches and usable

    async def _verify_plain(self, password: str, password_hash: str) -> bool:
        """An imported hash: plain bcrypt over the UTF-8 password, as other systems make it.

        bcrypt reads 72 bytes; a longer password never matches (the old system cut it short, and
        accepting any password sharing its first 72 bytes is what our own scheme prevents).
        """
        secret = password.encode("utf-8")
        if len(secret) > _BCRYPT_MAX_BYTES:
            await self._run(bcrypt.checkpw, self._prehash(password), self._dummy_hash)
            return False
        if _cost(password_hash) > self._rounds:
            # Imports take no hash costlier than ours, but one stored before that rule (or before
            # USERS_BCRYPT_ROUNDS was lowered) would make each guess cost 2^(cost - rounds) native
            # ones: a few anonymous guesses would hold every hashing thread. Not compared, at the
            # cost of a native check; the owner sets a new password with ForgotPassword.
            log.warning("imported password hash too costly to check", extra={"cost": _cost(password_hash)})
            await self._run(bcrypt.checkpw, self._prehash(password), self._dummy_hash)
            return False
        # $2y$ (PHP's name) is the same algorithm as $2b$.
        expected = ("$2b$" + password_hash[4:] if password_hash.startswith("$2y$") else password_hash).encode("ascii")
        matches = await self._run(_checkpw, secret, expected)
        if _cost(password_hash) < self._rounds:
            # A cheap imported hash would answer faster than a missing account's dummy check, telling
            # imported accounts apart: do that work too, until the first sign-in replaces the hash.
            await self._run(bcrypt.checkpw, self._prehash(password), self._dummy_hash)
        return matches

    async def _run(self, work: Callable[[bytes, bytes], _T], password: bytes, salt_or_hash: bytes) -> _T:
        with self._lock:
            if self._in_line >= self._capacity:
                # A rough wait: the jobs ahead, over the workers, at about a quarter second each.
                raise Overloaded(retry_after=timedelta(seconds=max(1.0, self._capacity / self._workers * 0.25)))
            self._in_line += 1
        # Counted until the job itself ends, not the call: a cancelled call's job still holds a worker.
        if self._waited is None:
            job = self._executor.submit(work, password, salt_or_hash)
        else:
            job = self._executor.submit(self._timed, time.monotonic(), work, password, salt_or_hash)
        job.add_done_callback(self._left_line)
        return await asyncio.wrap_future(job)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def jobs(self) -> int:
        """Jobs running or waiting for a worker."""
        return self._in_line

    def _timed(self, queued_at: float, work: Callable[[bytes, bytes], _T], password: bytes, salt_or_hash: bytes) -> _T:
        assert self._waited is not None
        self._waited(time.monotonic() - queued_at)
        return work(password, salt_or_hash)

    def _left_line(self, _: object) -> None:
        with self._lock:
            self._in_line -= 1

    def _prehash(self, password: str) -> bytes:
        digest = hmac.new(self._pepper, normalize_password(password).encode("utf-8"), hashlib.sha384).digest()
        return base64.b64encode(digest)


_BCRYPT_MAX_BYTES = 72


def _cost(password_hash: str) -> int:
    cost = password_hash[4:6]
    return int(cost) if cost.isdigit() else 0


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # Imports are checked for form, but a hash bcrypt still refuses must fail one sign-in, not raise.
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


def common_passwords(min_length: int) -> frozenset[str]:
    """The common passwords a new password may not be: zxcvbn's list of the 30,000 most used.

    Only those long enough to pass the length rule matter; the list is lower-case.
    """
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # a large module: loaded only here

    return frozenset(password for password in FREQUENCY_LISTS["passwords"] if len(password) >= min_length)
