"""The throttle tallies against the real database: compare-and-set counting, forgetting, rate hits,
and what a tally stores (its kind, account and expiry) and when it expires."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from tests.support.records import NOW as NEW_YEAR
from tests.support.stores import Stores
from users_grpc.domain import Tally
from users_grpc.repository import (
    MongoThrottleStore,
)

_T = TypeVar("_T")
NOW = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)
WINDOW = timedelta(minutes=15)
LATER = NOW + timedelta(hours=1)


async def count(store: MongoThrottleStore, key: str, now: datetime = NOW) -> Tally | None:
    seen = (await store.get([key])).get(key)
    account = key.split(":")[1]
    return await store.count_failure(key, account, seen=seen, now=now, window=WINDOW, expires_at=LATER)


async def test_counts_by_compare_and_set(stores: Stores) -> None:
    store = stores.throttle
    assert await count(store, "password:u1:a") == Tally(count=1, last_at=NOW)
    assert await count(store, "password:u1:a") == Tally(count=2, last_at=NOW)
    stale = Tally(count=1, last_at=NOW)
    refused = await store.count_failure("password:u1:a", "u1", seen=stale, now=NOW, window=WINDOW, expires_at=LATER)
    assert refused is None  # the tally moved on since it was seen
    assert (await store.get(["password:u1:a"]))["password:u1:a"].count == 2
    # A fresh count once the window has passed since the last failure.
    assert await count(store, "password:u1:a", NOW + WINDOW) == Tally(count=1, last_at=NOW + WINDOW)


async def test_parallel_counts_from_one_sight_succeed_once(stores: Stores) -> None:
    store = stores.throttle
    await count(store, "password:u1:a")
    seen = (await store.get(["password:u1:a"]))["password:u1:a"]
    results = await asyncio.gather(
        *(
            store.count_failure("password:u1:a", "u1", seen=seen, now=NOW, window=WINDOW, expires_at=LATER)
            for _ in range(10)
        )
    )
    assert sum(result is not None for result in results) == 1
    first_inserts = await asyncio.gather(
        *(
            store.count_failure("password:u1:b", "u1", seen=None, now=NOW, window=WINDOW, expires_at=LATER)
            for _ in range(10)
        )
    )
    assert sum(result is not None for result in first_inserts) == 1


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
    first = await tallies.count_failure(
        "password:u1:a", "u1", seen=None, now=NEW_YEAR, window=window, expires_at=NEW_YEAR + DAY
    )
    assert first == Tally(count=1, last_at=NEW_YEAR)
    assert await tallies.count_failure(
        "password:u1:a", "u1", seen=first, now=NEW_YEAR + SECOND, window=window, expires_at=NEW_YEAR + 2 * DAY
    ) == Tally(count=2, last_at=NEW_YEAR + SECOND)
    await tallies.count_failure(
        "password:u2:a", "u2", seen=None, now=NEW_YEAR, window=window, expires_at=NEW_YEAR + DAY
    )
    await tallies.uncount_failure("password:u2:a")
    await tallies.uncount_failure("password:u2:a")
    assert (await tallies.get(["password:u2:a"]))["password:u2:a"].count == 0
    assert await stores.housekeeping.purge_expired_tallies(NEW_YEAR + DAY + SECOND) == 1
    assert list(await tallies.get(["password:u1:a", "password:u2:a"])) == ["password:u1:a"]
    assert await stores.housekeeping.purge_expired_tallies(NEW_YEAR + 2 * DAY + SECOND) == 1
