"""One active admin always remains: the check every change that could remove the last one makes,
taken in turn across replicas so that two admins removing each other are never both refused.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from users_grpc.domain.errors import LastActiveAdmin, StorageUnavailable
from users_grpc.domain.model import User
from users_grpc.domain.ports import UserRepository

log = logging.getLogger(__name__)


async def keep_an_active_admin(users: UserRepository, before: User, undo: Callable[[], Awaitable[object]]) -> None:
    """After a change that took ``before`` out of the active admins: undo it, and refuse with
    LastActiveAdmin, if no active admin is left.

    There are no transactions (FerretDB has none), so the change is applied first, by one
    conditional update, and the active admins counted after it; the counts (with their undo) take
    turns, one at a time across replicas (a lease in the database). Exact: when a count sees no
    active admin left, every other change it saw is counted after it and sees the admin its undo
    restores, so those stand, and the refused change is one that, made after them, would leave
    none. Of two admins removing each other, the first count sees none and undoes its change, the
    second sees that admin back and stands: exactly one wins; beside a third admin, both stand.
    (Counting at once, both saw none and both undid: a false LAST_ACTIVE_ADMIN.) Callers bump
    the token version only once this passed, so an undone change leaves every token working.

    A crash between the change and its undo can leave no active admin, and so can a database
    that fails (or a call's deadline that passes) between them. The window lasts until the
    change's count has had its turn, and opens only while the last admins are being removed; an
    operator then makes an admin with the CLI (``users-grpc create-admin``), which needs database
    access, not an admin. A count that outlives its lease (a database slower than
    ADMIN_CHECK_LEASE_SECONDS) may overlap the next: both may then see none and undo, safe again.
    """
    if not before.is_active_admin:
        return
    # A caller going away mid-way cancels its call, not the check: a change left unchecked could
    # leave no active admin.
    check = asyncio.ensure_future(_count_in_turn(users, before, undo))
    _checks.add(check)
    check.add_done_callback(_check_settled)
    await asyncio.shield(check)


# How long a count may hold its turn: it holds it for one count and perhaps an undo; a replica
# that died holding it keeps the others waiting this long at most.
ADMIN_CHECK_LEASE_SECONDS = 10.0
# A count waits for its turn a little longer than a dead holder's lease lasts, then gives up.
_ADMIN_CHECK_WAIT_SECONDS = ADMIN_CHECK_LEASE_SECONDS + 2
_ADMIN_CHECK_POLL_SECONDS = (0.005, 0.05)  # the first wait between tries, and the longest
_checks: set[asyncio.Future[None]] = set()


def _check_settled(check: asyncio.Future[None]) -> None:
    _checks.discard(check)
    if not check.cancelled():
        check.exception()  # a caller that went away hears nothing of its outcome


async def _count_in_turn(users: UserRepository, before: User, undo: Callable[[], Awaitable[object]]) -> None:
    holder = secrets.token_hex(12)
    try:
        taken = await _take_turn(users, holder)
    except StorageUnavailable:
        taken = False
    if not taken:
        await undo()  # no turn, no count: the safe answer, and one to retry
        log.warning("change undone: no turn to count the active admins", extra={"user_id": before.id})
        raise StorageUnavailable()
    try:
        if await users.count_active_admins() > 0:
            return
        await undo()
    finally:
        try:
            await users.release_admin_check(holder)
        except StorageUnavailable:
            log.warning("the count of active admins not released; its lease runs out", extra={"user_id": before.id})
    log.warning("change refused: it would leave no active admin", extra={"user_id": before.id})
    raise LastActiveAdmin()


async def _take_turn(users: UserRepository, holder: str) -> bool:
    give_up_at = time.monotonic() + _ADMIN_CHECK_WAIT_SECONDS
    pause, longest = _ADMIN_CHECK_POLL_SECONDS
    while not await users.take_admin_check(holder, ADMIN_CHECK_LEASE_SECONDS):
        if time.monotonic() >= give_up_at:
            return False
        await asyncio.sleep(pause)  # the holder counts once and releases: a few milliseconds
        pause = min(pause * 2, longest)
    return True
