"""The password throttle over the fake store: tries in flight hold others at a limit until they settle."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from tests.support.fakes import FakeClock, FakeThrottleStore
from users_grpc.domain.errors import TooManyAttempts
from users_grpc.domain.model import Tally
from users_grpc.services.throttling import PasswordThrottle, Reservation, ThrottlePolicy

SOURCE = "10.0.0.1"
POLICY = ThrottlePolicy(free_attempts=3, account_free_attempts=100)


def throttle() -> tuple[PasswordThrottle, FakeThrottleStore, FakeClock]:
    store, clock = FakeThrottleStore(), FakeClock()
    return PasswordThrottle(store=store, clock=clock, policy=POLICY), store, clock


async def in_flight(throttle: PasswordThrottle, tries: int) -> list[Reservation]:
    return await asyncio.gather(*(throttle.reserve("u1", SOURCE) for _ in range(tries)))


async def held_try(
    throttle: PasswordThrottle, store: FakeThrottleStore, monkeypatch: pytest.MonkeyPatch
) -> asyncio.Task[Reservation]:
    """A try started now, once it has looked at the tallies (and found the limit reached)."""
    looked = asyncio.Event()
    read = store.get

    async def watched_read(keys: list[str]) -> dict[str, Tally]:
        looked.set()
        return await read(keys)

    monkeypatch.setattr(store, "get", watched_read)
    waiting = asyncio.create_task(throttle.reserve("u1", SOURCE))
    await looked.wait()
    assert not waiting.done()
    return waiting


def test_a_try_at_a_limit_reached_by_tries_in_flight_goes_on_when_one_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        passwords, store, _ = throttle()
        first = await in_flight(passwords, POLICY.free_attempts)
        waiting = await held_try(passwords, store, monkeypatch)
        await passwords.succeeded(first[0])  # the owner's: the source's tries are forgotten
        reservation = await asyncio.wait_for(waiting, timeout=10)
        assert reservation.counted == ("password:u1:10.0.0.1",)  # the source is the owner's now
        assert store.tallies["password:u1:10.0.0.1"][2].count == 1

    asyncio.run(body())


def test_a_try_at_a_limit_reached_by_tries_in_flight_is_held_when_they_all_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body() -> None:
        passwords, store, clock = throttle()
        first = await in_flight(passwords, POLICY.free_attempts)
        waiting = await held_try(passwords, store, monkeypatch)
        clock.advance(seconds=5)  # the comparisons took a while: the delay runs from their failures
        for reservation in first:
            await passwords.failed(reservation)
        with pytest.raises(TooManyAttempts) as held:
            await asyncio.wait_for(waiting, timeout=10)
        assert held.value.retry_after == POLICY.first_delay
        source = store.tallies["password:u1:10.0.0.1"][2]
        assert (source.count, source.pending) == (POLICY.free_attempts, 0)
        assert store.tallies["password:u1"][2].count == POLICY.free_attempts  # the held try gave its count back

    asyncio.run(body())


def test_a_try_in_flight_past_its_settling_time_holds_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its replica stopped mid-comparison: after the settling time it counts as failed, and a try
    held by the delays is refused at once, without waiting for it."""

    async def body() -> None:
        policy = ThrottlePolicy(free_attempts=3, first_delay=timedelta(minutes=1))
        store, clock = FakeThrottleStore(), FakeClock()
        passwords = PasswordThrottle(store=store, clock=clock, policy=policy)
        await asyncio.gather(*(passwords.reserve("u1", SOURCE) for _ in range(3)))  # never settled
        clock.advance(seconds=11)
        reads = 0
        read = store.get

        async def counted_read(keys: list[str]) -> dict[str, Tally]:
            nonlocal reads
            reads += 1
            return await read(keys)

        monkeypatch.setattr(store, "get", counted_read)
        with pytest.raises(TooManyAttempts) as held:
            await passwords.reserve("u1", SOURCE)
        assert held.value.retry_after == timedelta(seconds=49)
        assert reads == 1  # one look, no waiting

    asyncio.run(body())
