"""Brute-force defences that a stranger cannot turn against an account's owner.

Password guesses are counted per account *and source address*, before the
hash is compared (so parallel guesses cannot overrun a cap). A try that finds
a cap reached by tries still being compared waits for them to settle instead
of being refused: they may be the owner's own sign-ins (tabs, devices,
retries), and a success forgets them:

- From one source, the first ``free_attempts`` failures cost nothing; each
  further try must wait a delay that doubles per failure, up to ``max_delay``.
  A guesser slows only itself: the owner, from any other address, is not held.
- Across all sources, an account's failures from addresses it has *not*
  signed in from lately are counted too, with the same rising delays after
  ``account_free_attempts``: a guesser spread over many addresses is slowed,
  while sources the owner has signed in from are never held by it.
- A success forgets the source's failures and remembers the source; a
  completed password reset forgets every failure of the account.

Failures are forgotten ``window`` after the last one. Unknown accounts are
counted the same way, under their identifier, so the work and the answers do
not tell whether an account exists. All state is in the database, shared by
every replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from users_grpc.domain.errors import TooManyAttempts, TooManyRequests
from users_grpc.domain.model import Tally
from users_grpc.domain.ports import Clock, ThrottleStore

log = logging.getLogger(__name__)

# Below a limit tries count at once whatever the others do; a round is lost only to a tally that
# another try created, reset, forgot or counted at its limit, each of which moves it on. Losing
# this many rounds in a row is no contention that real sign-ins make: it is refused.
_COUNTING_ROUNDS = 20
# Longer than any comparison takes (the hashing queue refuses what would wait longer): a try still
# in flight after it is taken as failed (its replica stopped), so it holds no one up for good.
_SETTLING_TIME = timedelta(seconds=10)
# How often a try held by tries in flight looks at the tally again (they settle in replicas of their own).
_SETTLING_POLL_SECONDS = 0.02
# The longest one try waits for others, by this replica's own time: a safeguard should the clock
# stand still, as a test's does (by the shared clock, tries in flight settle in _SETTLING_TIME).
_LONGEST_WAIT_SECONDS = 3 * _SETTLING_TIME.total_seconds()


@dataclass(frozen=True, kw_only=True)
class ThrottlePolicy:
    free_attempts: int = 5
    account_free_attempts: int = 20
    window: timedelta = timedelta(minutes=15)
    first_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(minutes=15)
    known_source_lifetime: timedelta = timedelta(days=30)

    def wait(self, count: Tally | None, free: int, now: datetime) -> timedelta:
        """How long the next try must still wait after ``count``; zero if it may go now."""
        if count is None or count.last_at <= now - self.window or count.count < free:
            return timedelta(0)
        # The exponent is capped so a huge count cannot overflow a timedelta; max_delay caps the rest.
        delay: timedelta = min(self.first_delay * 2 ** min(count.count - free, 32), self.max_delay)
        return max(count.last_at + delay - now, timedelta(0))


@dataclass(frozen=True)
class Reservation:
    """The failures counted for one try, to forget on success or give back if it never compared."""

    account: str
    source: str
    counted: tuple[str, ...]


class _Round(enum.Enum):
    WAITS = "the limit is reached by tries still in flight"
    LOST = "another try changed a tally since it was read"


class PasswordThrottle:
    def __init__(self, *, store: ThrottleStore, clock: Clock, policy: ThrottlePolicy) -> None:
        self._store = store
        self._clock = clock
        self._policy = policy

    async def reserve(self, account: str, source: str) -> Reservation:
        """Count a try as failed until it succeeds; TooManyAttempts if it must wait.

        ``account`` is the user id, or for an unknown account its identifier key. Each try is
        counted before its comparison, so parallel tries cannot pass a limit; one that finds the
        limit reached by tries still in flight waits for them to settle (a success forgets them)
        rather than being refused for what may yet be the owner's own sign-ins.
        """
        loop = asyncio.get_running_loop()
        stop_waiting_at = loop.time() + _LONGEST_WAIT_SECONDS
        lost_rounds = 0
        while True:
            outcome = await self._count_once(account, source, may_wait=loop.time() < stop_waiting_at)
            if isinstance(outcome, Reservation):
                return outcome
            if outcome is _Round.WAITS:
                await asyncio.sleep(_SETTLING_POLL_SECONDS)
                continue
            lost_rounds += 1
            if lost_rounds == _COUNTING_ROUNDS:
                log.warning("password attempts contended", extra={"user_id": account, "source": source})
                raise TooManyAttempts(retry_after=self._policy.first_delay)

    async def _count_once(self, account: str, source: str, *, may_wait: bool) -> Reservation | _Round:
        """One look at the tallies: the try counted on each, or why not (holding nothing then)."""
        source_key, account_key, known_key = _keys(account, source)
        now = self._clock.now()
        counts = await self._store.get([source_key, account_key, known_key])
        known = known_key in counts and counts[known_key].last_at > now - self._policy.known_source_lifetime
        limits = [(source_key, self._policy.free_attempts)]
        if not known:
            limits.append((account_key, self._policy.account_free_attempts))
        counted = Reservation(account=account, source=source, counted=())
        for key, free in limits:
            tally = counts.get(key)
            wait = self._policy.wait(tally, free, now)
            if wait > timedelta(0):
                # Hold nothing while waiting or refused, so two tries never wait on each other.
                await self.release(counted)
                if may_wait and _in_flight(tally, now):
                    return _Round.WAITS
                log.warning("password attempts throttled", extra={"user_id": account, "source": source})
                raise TooManyAttempts(retry_after=wait)
            if not await self._store.count_failure(
                key,
                account,
                seen=tally,
                below=free,
                now=now,
                window=self._policy.window,
                settles_by=now + _SETTLING_TIME,
                expires_at=self._expiry(now),
            ):
                await self.release(counted)
                return _Round.LOST
            counted = dataclasses.replace(counted, counted=(*counted.counted, key))
        return counted

    async def failed(self, reservation: Reservation) -> None:
        """The try compared and failed (or was cancelled while comparing): it stays counted, settled.

        Its delay runs from now, not from when it was counted: a slow comparison shortens no wait.
        """
        now = self._clock.now()
        for key in reservation.counted:
            await self._store.settle_failure(key, now)

    async def succeeded(self, reservation: Reservation) -> None:
        """The password matched: forget this source's failures and remember the source as the owner's.

        The account-wide count gives back this try, so the owner's own sign-ins never add up.
        """
        source_key, account_key, known_key = _keys(reservation.account, reservation.source)
        now = self._clock.now()
        await self._store.forget(source_key)
        if account_key in reservation.counted:
            await self._store.uncount_failure(account_key)
        await self._store.remember(known_key, reservation.account, now, now + self._policy.known_source_lifetime)

    async def release(self, reservation: Reservation) -> None:
        """Give back what a try counted when it never reached the comparison."""
        for key in reservation.counted:
            await self._store.uncount_failure(key)

    async def forget_account(self, account: str) -> None:
        """After a completed reset: the owner proved the mailbox, so every failure is forgotten."""
        await self._store.forget_account(account)

    def _expiry(self, now: datetime) -> datetime:
        # A count past the window and the longest delay no longer matters; housekeeping deletes it.
        return now + self._policy.window + self._policy.max_delay


def _in_flight(tally: Tally | None, now: datetime) -> bool:
    """Whether some of the tries counted on the tally are still being compared."""
    return tally is not None and tally.pending > 0 and tally.settles_by is not None and tally.settles_by > now


def _keys(account: str, source: str) -> tuple[str, str, str]:
    return f"password:{account}:{source}", f"password:{account}", f"known:{account}:{source}"


class Flow(enum.Enum):
    """What an anonymous call is part of. Each budgeted flow has its own per-source budget, as
    Keycloak, Kratos and ZITADEL limit per flow: a backend's registrations from one host use up
    the sign-up budget, never its admin's sign-in (users_grpc/grpc_api/access.py names each RPC's flow)."""

    SIGN_UP = "sign_up"
    ACTIVATION = "activation"
    SIGN_IN = "sign_in"
    RECOVERY = "recovery"
    # Neither costs a password hash nor a mail: no budget.
    SESSION = "session"
    PUBLIC_KEYS = "public_keys"


@dataclass(frozen=True, kw_only=True)
class RateLimitPolicy:
    # Calls per source per window, by flow; a flow not listed has no budget.
    budgets: Mapping[Flow, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys((Flow.SIGN_UP, Flow.ACTIVATION, Flow.SIGN_IN, Flow.RECOVERY), 60)
    )
    window: timedelta = timedelta(minutes=1)


class SourceRateLimit:
    """At most a flow's budget of costly anonymous calls per source address per window, across replicas."""

    def __init__(self, *, store: ThrottleStore, clock: Clock, policy: RateLimitPolicy) -> None:
        self._store = store
        self._clock = clock
        self._policy = policy

    async def check(self, source: str, flow: Flow) -> None:
        budget = self._policy.budgets.get(flow)
        if budget is None:
            return
        now = self._clock.now()
        window = self._policy.window.total_seconds()
        start = int(now.timestamp() // window * window)
        ends = datetime.fromtimestamp(start + window, now.tzinfo)
        calls = await self._store.hit(f"rate:{flow.value}:{source}:{start}", ends)
        if calls > budget:
            log.warning("rate limited", extra={"source": source, "flow": flow.value})
            raise TooManyRequests(retry_after=ends - now)
