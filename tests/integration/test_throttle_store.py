"""The throttle tallies against the real database: compare-and-set counting, forgetting, rate hits,
and what a tally stores (its kind, account and expiry) and when it expires."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tests.support.records import NOW as NEW_YEAR
from tests.support.stores import Stores
from users_grpc.adapters.mongo.throttles import MongoThrottleStore
from users_grpc.domain.model import Tally

_T = TypeVar("_T")
NOW = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)
WINDOW = timedelta(minutes=15)
LATER = NOW + timedelta(hours=1)
SETTLES_BY = NOW + timedelta(seconds=10)


async def count(store: MongoThrottleStore, key: str, now: datetime = NOW, below: int = 5) -> Tally | None:
    """Count a try on the tally as read; the tally after, or None if not counted."""
    seen = (await store.get([key])).get(key)
    account = key.split(":")[1]
    counted = await store.count_failure(
        key, account, seen=seen, below=below, now=now, window=WINDOW, settles_by=SETTLES_BY, expires_at=LATER
    )
    return (await store.get([key]))[key] if counted else None


async def test_counts_below_the_limit_at_once_and_at_it_by_compare_and_set(stores: Stores) -> None:
    store = stores.throttle
    assert await count(store, "password:u1:a") == Tally(count=1, last_at=NOW, pending=1, settles_by=SETTLES_BY)
    assert await count(store, "password:u1:a", below=2) == Tally(count=2, last_at=NOW, pending=2, settles_by=SETTLES_BY)
    stale = Tally(count=1, last_at=NOW)
    at_the_limit: dict[str, Any] = {
        "below": 2,
        "now": NOW,
        "window": WINDOW,
        "settles_by": SETTLES_BY,
        "expires_at": LATER,
    }
    assert not await store.count_failure("password:u1:a", "u1", seen=stale, **at_the_limit)  # it moved on
    assert (await store.get(["password:u1:a"]))["password:u1:a"].count == 2
    # Below the limit a try counts though the tally moved on since it was read.
    assert await store.count_failure("password:u1:a", "u1", seen=stale, **{**at_the_limit, "below": 3})
    assert (await store.get(["password:u1:a"]))["password:u1:a"].count == 3
    # A fresh count once the window has passed since the last failure.
    assert await count(store, "password:u1:a", NOW + WINDOW) == Tally(
        count=1, last_at=NOW + WINDOW, pending=1, settles_by=SETTLES_BY
    )


async def test_parallel_counts_all_count_below_the_limit_and_one_at_it(stores: Stores) -> None:
    store = stores.throttle
    await count(store, "password:u1:a")
    seen = (await store.get(["password:u1:a"]))["password:u1:a"]

    async def counted(key: str, seen: Tally | None, below: int) -> bool:
        return await store.count_failure(
            key, "u1", seen=seen, below=below, now=NOW, window=WINDOW, settles_by=SETTLES_BY, expires_at=LATER
        )

    below = await asyncio.gather(*(counted("password:u1:a", seen, 6) for _ in range(10)))
    assert sum(below) == 5  # up to the limit of 6, every one from the one sight
    assert (await store.get(["password:u1:a"]))["password:u1:a"].count == 6
    seen = (await store.get(["password:u1:a"]))["password:u1:a"]
    at_it = await asyncio.gather(*(counted("password:u1:a", seen, 6) for _ in range(10)))
    assert sum(at_it) == 1  # past it, one (the one a delay lets through) by compare-and-set
    first_inserts = await asyncio.gather(*(counted("password:u1:b", None, 6) for _ in range(10)))
    assert sum(first_inserts) == 1


async def test_a_settled_failure_stays_counted_and_a_given_back_one_does_not(stores: Stores) -> None:
    store = stores.throttle
    for _ in range(3):
        await count(store, "password:u1:a")
    await store.settle_failure("password:u1:a", NOW + timedelta(seconds=2))
    await store.uncount_failure("password:u1:a")
    tally = (await store.get(["password:u1:a"]))["password:u1:a"]
    # The delays run from the failure, not from when it was counted.
    assert (tally.count, tally.pending, tally.last_at) == (2, 1, NOW + timedelta(seconds=2))
    for _ in range(2):
        await store.settle_failure("password:u1:a", NOW + timedelta(seconds=1))
        await store.uncount_failure("password:u1:a")  # nothing in flight to give back
    tally = (await store.get(["password:u1:a"]))["password:u1:a"]
    assert (tally.count, tally.pending, tally.last_at) == (2, 0, NOW + timedelta(seconds=2))


async def test_uncount_forget_and_remember(stores: Stores) -> None:
    store = stores.throttle
    for key in ("password:u1:a", "password:u1:a", "password:u1", "password:u2:a"):
        await count(store, key)
    await store.uncount_failure("password:u1:a")
    await store.remember("known:u1:a", "u1", NOW, LATER)
    tallies = await store.get(["password:u1:a", "password:u1", "password:u2:a", "known:u1:a"])
    assert {key: tally.count for key, tally in tallies.items()} == {
        "password:u1:a": 1,
        "password:u1": 1,
        "password:u2:a": 1,
        "known:u1:a": 1,
    }
    await store.forget_account("u1")  # failures only: the known source stays
    assert set(await store.get(["password:u1:a", "password:u1", "password:u2:a", "known:u1:a"])) == {
        "password:u2:a",
        "known:u1:a",
    }
    await store.forget("known:u1:a")
    assert await store.get(["known:u1:a"]) == {}


async def test_hits_count_every_request_even_in_parallel(stores: Stores) -> None:
    store = stores.throttle
    counts = await asyncio.gather(*(store.hit("rate:10.0.0.1:0", LATER) for _ in range(12)))
    assert sorted(counts) == list(range(1, 13))


async def test_tallies_are_stored_under_their_key_with_their_kind_account_and_expiry(stores: Stores) -> None:
    tallies, raw = stores.throttle, stores.database["throttles"]
    await tallies.remember("known:u1:10.0.0.1", "u1", NEW_YEAR, NEW_YEAR + DAY)
    await tallies.remember("known:u1:10.0.0.1", "u1", NEW_YEAR + SECOND, NEW_YEAR + 2 * DAY)
    await tallies.remember("known:u2:10.0.0.1", "u2", NEW_YEAR, NEW_YEAR + DAY)
    assert [await tallies.hit("rate:10.0.0.1:0", NEW_YEAR + SECOND) for _ in range(2)] == [1, 2]
    assert await tallies.hit("rate:10.0.0.2:0", NEW_YEAR + SECOND) == 1
    assert await raw.find_one({"_id": "known:u1:10.0.0.1"}) == {
        "_id": "known:u1:10.0.0.1",
        "account": "u1",
        "kind": "known",
        "count": 2,
        "last_at": NEW_YEAR + SECOND,
        "expires_at": NEW_YEAR + 2 * DAY,
    }
    assert await raw.find_one({"_id": "rate:10.0.0.1:0"}) == {
        "_id": "rate:10.0.0.1:0",
        "count": 2,
        "kind": "rate",
        "expires_at": NEW_YEAR + SECOND,
    }
    # Each tally goes when its own time is up.
    assert await stores.housekeeping.purge_expired_tallies(NEW_YEAR + 2 * SECOND) == 2
    assert await stores.housekeeping.purge_expired_tallies(NEW_YEAR + DAY + SECOND) == 1
    assert [document["_id"] async for document in raw.find()] == ["known:u1:10.0.0.1"]


async def test_a_failure_tally_expires_when_its_last_count_says_and_is_uncounted_down_to_zero_only(
    stores: Stores,
) -> None:
    tallies = stores.throttle
    window = timedelta(minutes=15)
    limits: dict[str, Any] = {"below": 5, "window": window, "settles_by": NEW_YEAR + SECOND}
    assert await tallies.count_failure(
        "password:u1:a", "u1", seen=None, now=NEW_YEAR, expires_at=NEW_YEAR + DAY, **limits
    )
    first = (await tallies.get(["password:u1:a"]))["password:u1:a"]
    assert first == Tally(count=1, last_at=NEW_YEAR, pending=1, settles_by=NEW_YEAR + SECOND)
    assert await tallies.count_failure(
        "password:u1:a", "u1", seen=first, now=NEW_YEAR + SECOND, expires_at=NEW_YEAR + 2 * DAY, **limits
    )
    assert (await tallies.get(["password:u1:a"]))["password:u1:a"] == Tally(
        count=2, last_at=NEW_YEAR + SECOND, pending=2, settles_by=NEW_YEAR + SECOND
    )
    await tallies.count_failure("password:u2:a", "u2", seen=None, now=NEW_YEAR, expires_at=NEW_YEAR + DAY, **limits)
    await tallies.uncount_failure("password:u2:a")
    await tallies.uncount_failure("password:u2:a")
    assert (await tallies.get(["password:u2:a"]))["password:u2:a"].count == 0
    assert await stores.housekeeping.purge_expired_tallies(NEW_YEAR + DAY + SECOND) == 1
    assert list(await tallies.get(["password:u1:a", "password:u2:a"])) == ["password:u1:a"]
    assert await stores.housekeeping.purge_expired_tallies(NEW_YEAR + 2 * DAY + SECOND) == 1
