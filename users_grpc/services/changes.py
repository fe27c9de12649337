"""The change feed: WatchUserChanges streams every change to users, in one global order.

FerretDB has no change streams (and no transactions), so the feed is built from what both it and
MongoDB have: single-document atomic updates and unique indexes.

- Every change of a user pushes a pending entry into the user's document in the same update
  that makes the change, and counts the user's change number up: no change without its entry.
- A publisher moves a user's pending entries, in their order, into ``user_changes``, each at
  sequence number (the highest so far) + 1, which the unique ``_id`` makes dense: a publisher
  racing another for a number fails and takes the next. The unique (user, change number) index
  makes a repeated publish a no-op, so any number of publishers may run: the request that made
  the change right after its update (the fast path), and every replica's sweep (:meth:`ChangeFeed.run`),
  which publishes what a publisher that died or was cut short left.
- A deletion marks the document (it is gone for every call from then on), publishes its
  ``deleted`` change with the others, moves the user's pending notices to the outbox, and only
  then deletes the document.

Why a consumer that resumes from its last cursor can never miss a change: changes are
numbered 1, 2, 3, ... without holes (number n + 1 is inserted only by a publisher that read n),
a change is numbered only once it is stored, and the stream delivers numbers strictly one
after another, reading again at anything that looks like a hole. So no change can appear
later with a number below one already delivered. Retention deletes only the oldest changes
and keeps the newest; a cursor older than what is kept is refused (FAILED_PRECONDITION), never
skipped. The proof in full: :class:`users_grpc.adapters.mongo.change_log.MongoChangeLog`.

Exactly once per cursor: each stored change has one number, and a resumed stream starts right
after the cursor given. In order: the global order is the order of publication; each user's
changes are published in the order they were made (their change numbers count 1, 2, 3, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

from users_grpc.domain import base64url
from users_grpc.domain.errors import ChangeCursorGone, FieldViolation, InvalidArgument, StorageUnavailable
from users_grpc.domain.model import UserChange
from users_grpc.domain.ports import ChangeLog

log = logging.getLogger(__name__)

# Changes read per query while catching up.
BATCH = 100
# Left to the request that made a change before a sweep publishes it too (harmless, but twice the work).
SWEEP_GRACE = timedelta(seconds=2)
# The sweep only recovers from crashes, so it runs this many polls apart: each is a query of the users.
SWEEP_EVERY_POLLS = 5
# Reads in a row that may fail (the database away) before a stream ends with UNAVAILABLE.
_READ_ATTEMPTS = 5
_CURSOR_PREFIX = b"uc1"


def cursor_of(sequence: int) -> str:
    """The opaque cursor of the change numbered ``sequence``."""
    return base64url.encode(_CURSOR_PREFIX + sequence.to_bytes(8, "big"))


def sequence_of(cursor: str) -> int:
    """The number a cursor names; 0 for the empty cursor. INVALID_ARGUMENT for anything
    :func:`cursor_of` did not make."""
    if not cursor:
        return 0
    try:
        raw = base64url.decode(cursor)
    except ValueError:
        raw = b""
    if len(raw) != len(_CURSOR_PREFIX) + 8 or not raw.startswith(_CURSOR_PREFIX):
        raise InvalidArgument([FieldViolation("after", "is not a cursor of this change feed")])
    sequence = int.from_bytes(raw[len(_CURSOR_PREFIX) :], "big")
    # Sequences are BSON 8-byte signed integers: past 2**63 - 1 no change was ever numbered, nor can be queried.
    if sequence >= 2**63 or cursor_of(sequence) != cursor:
        raise InvalidArgument([FieldViolation("after", "is not a cursor of this change feed")])
    return sequence


class ChangeFeed:
    def __init__(self, *, log: ChangeLog, poll_seconds: float) -> None:
        self._log = log
        self._poll_seconds = poll_seconds
        self._watchers: set[asyncio.Event] = set()
        self._stopping = asyncio.Event()

    @property
    def watchers(self) -> int:
        """Streams of this process reading the feed now."""
        return len(self._watchers)

    def published(self) -> None:
        """This process published changes: its watchers read at once rather than at their next poll."""
        for watcher in self._watchers:
            watcher.set()

    async def watch(
        self, after: str, *, still_admitted: Callable[[], Awaitable[None]]
    ) -> AsyncGenerator[UserChange, None]:
        """Every change after the cursor ``after``, in order, then each new one as it comes, until
        the caller goes away or ``still_admitted`` raises. The empty cursor starts at the oldest
        change kept.

        ``still_admitted`` runs after every read, before its batch is delivered (and at every idle
        poll): a revocation is stored before any change made after it is published, so a batch
        that holds such a change is read before a check that sees the revocation, and is never
        delivered. Its cost is one read of the caller's account per poll (per batch of
        :data:`BATCH` while catching up), beside the change log's own read."""
        position = sequence_of(after)
        if position > await self._log.last_sequence():
            # Not from this feed's past: a restored older backup, or another deployment's database.
            raise ChangeCursorGone("the cursor is ahead of this change feed: resync and watch with an empty cursor")
        from_oldest = not after
        wake = asyncio.Event()
        self._watchers.add(wake)
        try:
            while True:
                wake.clear()
                batch = await self._read_after(position)
                if batch and batch[0].sequence != position + 1:
                    if from_oldest:
                        position = batch[0].sequence - 1
                    else:
                        # Read again before concluding: a change may only now have become visible.
                        batch = await self._read_after(position)
                        if batch and batch[0].sequence != position + 1:
                            raise ChangeCursorGone()
                from_oldest = False
                await still_admitted()
                consecutive = True
                for change in batch:
                    if change.sequence != position + 1:
                        consecutive = False  # a hole: read again from the last change delivered
                        break
                    yield change
                    position = change.sequence
                if consecutive and len(batch) == BATCH:
                    continue  # catching up: more are waiting
                if not consecutive:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=self._poll_seconds)
        finally:
            self._watchers.discard(wake)

    async def _read_after(self, position: int) -> list[UserChange]:
        """A batch, waiting out a short database outage (as the poll would): a stream ends with
        UNAVAILABLE only after several reads in a row failed."""
        for attempt in range(_READ_ATTEMPTS):
            try:
                return await self._log.read_after(position, BATCH)
            except StorageUnavailable:
                if attempt == _READ_ATTEMPTS - 1:
                    raise
                log.warning("change feed read failed; retrying")
                await asyncio.sleep(self._poll_seconds)
        raise AssertionError("unreachable")

    async def run(self) -> None:
        """Sweep until :meth:`stop`: publish the changes that no request published (see the module docstring)."""
        interval = self._poll_seconds * SWEEP_EVERY_POLLS
        while not self._stopping.is_set():
            try:
                if await self._log.sweep(datetime.now(UTC) - SWEEP_GRACE):
                    self.published()
            except Exception:
                # Most likely the database is away; the next round tries again.
                log.warning("change sweep failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=interval)

    def stop(self) -> None:
        self._stopping.set()
