"""Concurrent reads by key sent as one: reads asked for while no batch is on its way join one,
sent once the event loop has run the turn's other callbacks; reads asked for while a batch is on
its way wait for it to come back and then go together, as the next batch (or at once, when they
fill one). Each batch is a single query (``find({_id: {$in: [...]}})``); the same key twice in a
batch is read once.

A batch takes readers only until it is sent. A read that starts once a write has completed
therefore joins a batch sent after that write, and sees it: coalescing never serves an answer
read before the caller asked (the revocation promise, "at once", holds as without it).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")

MOST_PER_BATCH = 100


class _Batch(Generic[_K, _V]):
    def __init__(self) -> None:
        # Sent in the context of its first reader: that call's database budget and timeout.
        self.context = contextvars.copy_context()
        self.answers: dict[_K, asyncio.Future[_V | None]] = {}


class ReadBatches(Generic[_K, _V]):
    """Reads of ``fetch`` (keys to the values found; a key not found is left out) in batches of at
    most ``most`` keys."""

    def __init__(self, fetch: Callable[[list[_K]], Awaitable[Mapping[_K, _V]]], *, most: int = MOST_PER_BATCH) -> None:
        self._fetch = fetch
        self._most = most
        self._open: _Batch[_K, _V] | None = None  # still taking readers
        self._sending: set[asyncio.Task[None]] = set()

    async def read(self, key: _K) -> _V | None:
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
            if not self._sending:
                loop.call_soon(self._send, batch)
            # else: sent when the batch on its way comes back (_came_back)
        answer = batch.answers.get(key)
        if answer is None:
            answer = batch.answers[key] = loop.create_future()
            # Its outcome counts as seen even if every reader gave up on it.
            answer.add_done_callback(_observed)
            if len(batch.answers) >= self._most:
                self._send(batch)
        # Shielded: one reader giving up must not cancel the answer others wait for.
        return await asyncio.shield(answer)

    def _send(self, batch: _Batch[_K, _V]) -> None:
        if self._open is not batch:
            return  # already sent, full
        self._open = None
        task = asyncio.get_running_loop().create_task(self._answer(batch), context=batch.context)
        self._sending.add(task)
        task.add_done_callback(self._came_back)

    def _came_back(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._open is not None and not self._sending:
            self._send(self._open)

    async def _answer(self, batch: _Batch[_K, _V]) -> None:
        try:
            found = await self._fetch(list(batch.answers))
        except asyncio.CancelledError:
            for answer in batch.answers.values():
                answer.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - each reader of the batch gets it, as alone
            for answer in batch.answers.values():
                if not answer.done():
                    answer.set_exception(error)
        else:
            for key, answer in batch.answers.items():
                if not answer.done():
                    answer.set_result(found.get(key))


def _observed(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()
