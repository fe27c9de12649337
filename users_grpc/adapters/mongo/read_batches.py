"""Concurrent reads by key sent as one: every read asked for in the same turn of the event loop
joins one batch, which goes to the database as a single query (``find({_id: {$in: [...]}})``)
once the loop has run the turn's other callbacks; the same key twice in a batch is read once.

A batch takes readers only until it is sent. A read that starts once a write has completed
therefore joins a batch sent after that write, and sees it: coalescing never serves an answer
read before the caller asked (the revocation promise, "at once", holds as without it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")

MOST_PER_BATCH = 100


class ReadBatches(Generic[_K, _V]):
    """Reads of ``fetch`` (keys to the values found; a key not found is left out) in batches of at
    most ``most`` keys."""

    def __init__(self, fetch: Callable[[list[_K]], Awaitable[Mapping[_K, _V]]], *, most: int = MOST_PER_BATCH) -> None:
        self._fetch = fetch
        self._most = most
        # The batch still taking readers: each key's answer, to come.
        self._open: dict[_K, asyncio.Future[_V | None]] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def read(self, key: _K) -> _V | None:
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is None:
            batch = self._open = {}
            # Sent in the context of its first reader (the call's database budget and timeout).
            loop.call_soon(self._send, batch)
        answer = batch.get(key)
        if answer is None:
            answer = batch[key] = loop.create_future()
            # Its outcome counts as seen even if every reader gave up on it.
            answer.add_done_callback(_observed)
            if len(batch) >= self._most:
                self._send(batch)
        # Shielded: one reader giving up must not cancel the answer others wait for.
        return await asyncio.shield(answer)

    def _send(self, batch: dict[_K, asyncio.Future[_V | None]]) -> None:
        if self._open is not batch:
            return  # already sent, full
        self._open = None
        task = asyncio.ensure_future(self._answer(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _answer(self, batch: dict[_K, asyncio.Future[_V | None]]) -> None:
        try:
            found = await self._fetch(list(batch))
        except asyncio.CancelledError:
            for answer in batch.values():
                answer.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - each reader of the batch gets it, as alone
            for answer in batch.values():
                if not answer.done():
                    answer.set_exception(error)
            return
        for key, answer in batch.items():
            if not answer.done():
                answer.set_result(found.get(key))


def _observed(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()
