"""How every store method calls the database: within the call's :data:`database_budget`, shielded
from the call's cancellation, an unreachable database reported as :class:`StorageUnavailable`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pymongo
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, PyMongoError

from users_grpc.adapters.mongo.documents import Document
from users_grpc.domain.budget import DatabaseBudget, database_budget
from users_grpc.domain.errors import StorageUnavailable

_P = ParamSpec("_P")
_R = TypeVar("_R")

# Database work whose call was cancelled (a deadline passed, the client went away) while it ran:
# held here until it ends on its own, within its budget (see storage_call).
_abandoned: set[asyncio.Future[Any]] = set()
# Beyond this many (PyMongo's default pool size), abandoned work is cancelled as before: callers
# that cancel call after call must not pile up work the concurrency limit no longer counts.
_MOST_ABANDONED = 100


def _forget_abandoned(work: asyncio.Future[Any]) -> None:
    _abandoned.discard(work)
    if not work.cancelled():
        work.exception()  # nobody awaits it any more: its outcome was reported to no one


async def cancel_abandoned_work() -> None:
    """Cancel this loop's abandoned database work (at shutdown, before the client closes under
    it): no one waits for its outcome."""
    loop = asyncio.get_running_loop()
    mine = [work for work in list(_abandoned) if work.get_loop() is loop]
    for work in mine:
        work.cancel()
    if mine:
        await asyncio.wait(mine, timeout=1)


def storage_call(method: Callable[_P, Coroutine[Any, Any, _R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Bound the call by the current :data:`database_budget`, and turn an unreachable or
    timed-out database into :class:`StorageUnavailable`.

    Within a call, the work is shielded from the call's cancellation and ends at its budget
    instead (PyMongo's own timeout, which the budget keeps within the call's deadline).
    Cancelling PyMongo mid-operation throws its connection away, and mid-connect leaks the
    socket (PyMongo 4.20, PYTHON-5867): a client giving up should cost neither.

    Other PyMongo errors are bugs and propagate as they are.
    """

    async def bounded(budget: DatabaseBudget | None, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            if budget is None:
                return await method(*args, **kwargs)
            with pymongo.timeout(budget.seconds()):
                return await method(*args, **kwargs)
        except PyMongoError as error:
            if isinstance(error, ConnectionFailure) or error.timeout:
                raise StorageUnavailable() from error
            raise

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        budget = database_budget.get()
        if budget is None:  # background work, which stops only when the server does
            return await bounded(None, *args, **kwargs)
        work = asyncio.ensure_future(bounded(budget, *args, **kwargs))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if len(_abandoned) >= _MOST_ABANDONED:
                work.cancel()
            _abandoned.add(work)
            work.add_done_callback(_forget_abandoned)
            raise

    return wrapper


async def ping(database: AsyncDatabase[Document], timeout_seconds: float) -> bool:
    """True if the database answers a ping within ``timeout_seconds``."""
    try:
        with pymongo.timeout(timeout_seconds):
            await database.command("ping")
    except PyMongoError:
        return False
    return True
