"""The batching of concurrent reads (adapters/mongo/read_batches.py) against a fake store; the
real database's side is tests/e2e/test_coalesced_reads.py."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from users_grpc.adapters.mongo.read_batches import ReadBatches


class FakeStore:
    """Answers each fetch with the values as they were when it was sent; ``hold`` keeps a fetch
    in flight until released."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)
        self.fetches: list[list[str]] = []
        self.sent = asyncio.Event()
        self.hold: asyncio.Event | None = None
        self.error: Exception | None = None

    async def fetch(self, keys: list[str]) -> dict[str, str]:
        self.fetches.append(keys)
        read = {key: self.values[key] for key in keys if key in self.values}
        self.sent.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error
        return read


async def test_reads_asked_for_together_are_one_fetch_and_the_same_key_is_read_once() -> None:
    store = FakeStore({"a": "1", "b": "2"})
    batches = ReadBatches(store.fetch)

    found = await asyncio.gather(batches.read("a"), batches.read("b"), batches.read("a"), batches.read("x"))

    assert list(found) == ["1", "2", "1", None]
    assert store.fetches == [["a", "b", "x"]]


async def test_a_read_asked_for_after_a_batch_was_sent_never_joins_it() -> None:
    store = FakeStore({"a": "before"})
    store.hold = asyncio.Event()
    batches = ReadBatches(store.fetch)
    first = asyncio.ensure_future(batches.read("a"))
    await store.sent.wait()  # the first batch is on its way to the database

    store.values["a"] = "after"  # a write completes (a deactivation, a revocation)
    second = asyncio.ensure_future(batches.read("a"))
    store.hold.set()

    assert (await first, await second) == ("before", "after")
    assert store.fetches == [["a"], ["a"]]


async def test_reads_asked_for_while_a_batch_is_on_its_way_go_together_once_it_is_back() -> None:
    store = FakeStore({"a": "1", "b": "2", "c": "3"})
    store.hold = asyncio.Event()
    batches = ReadBatches(store.fetch)
    first = asyncio.ensure_future(batches.read("a"))
    await store.sent.wait()

    later = [asyncio.ensure_future(batches.read(key)) for key in ("b", "c", "b")]
    await asyncio.sleep(0)  # one turn: they have asked, and nothing more is sent
    assert store.fetches == [["a"]]
    store.hold.set()

    assert (await first, *[await read for read in later]) == ("1", "2", "3", "2")
    assert store.fetches == [["a"], ["b", "c"]]


async def test_a_batch_holds_at_most_its_limit() -> None:
    store = FakeStore({f"k{n}": str(n) for n in range(250)})
    batches = ReadBatches(store.fetch, most=100)

    found = await asyncio.gather(*(batches.read(f"k{n}") for n in range(250)))

    assert found == [str(n) for n in range(250)]
    assert [len(keys) for keys in store.fetches] == [100, 100, 50]


async def test_a_failed_fetch_fails_each_of_its_readers_and_the_next_read_fetches_again() -> None:
    store = FakeStore({"a": "1"})
    store.error = ConnectionError("database gone")
    batches = ReadBatches(store.fetch)

    outcomes = await asyncio.gather(batches.read("a"), batches.read("b"), return_exceptions=True)
    assert [type(outcome) for outcome in outcomes] == [ConnectionError, ConnectionError]

    store.error = None
    assert await batches.read("a") == "1"
    assert store.fetches == [["a", "b"], ["a"]]


async def test_a_reader_giving_up_leaves_the_others_their_answer() -> None:
    store = FakeStore({"a": "1"})
    store.hold = asyncio.Event()
    batches = ReadBatches(store.fetch)
    quitter = asyncio.ensure_future(batches.read("a"))
    stayer = asyncio.ensure_future(batches.read("a"))
    await store.sent.wait()

    quitter.cancel()
    store.hold.set()

    assert await stayer == "1"
    with pytest.raises(asyncio.CancelledError):
        await quitter
