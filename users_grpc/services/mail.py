"""Mail: an outbox in the database, a sender that drains it, and two transports.

RPCs only enqueue (:meth:`MailDelivery.send`), so a slow or dead SMTP server
never blocks or fails them. Each replica runs :meth:`MailDelivery.run`; a
claim is a lease on one mail, so replicas share the work, each mail goes out
once, and a sender that dies mid-delivery only delays it (it may then go out
twice, never zero times).

Security notices do not go through :meth:`MailDelivery.send`: the update that
makes a change pends its notice in the user's document (so no deadline,
cancellation or crash can apply one without the other), and the sender moves
pending notices into the outbox under their own ids before delivering.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from users_grpc.domain.model import Mail, QueuedMail
from users_grpc.domain.ports import Clock, MailQueue, MailTransport, NoticeStore

log = logging.getLogger(__name__)

# Users whose notices one pass moves before it turns to delivering: a bound, not a quota.
_NOTICE_BATCHES_PER_PASS = 100
# How soon a notice's outbox copy is tried again while a mover still holds the notice.
_SETTLE_RETRY = timedelta(seconds=0.5)


class MailDelivery:
    """Queues mail for the services and delivers it in the background, with retries."""

    def __init__(
        self,
        *,
        queue: MailQueue,
        transport: MailTransport,
        clock: Clock,
        poll_seconds: float,
        max_attempts: int,
        notices: NoticeStore | None = None,
        lease_seconds: float = 60.0,
        first_retry_seconds: float = 5.0,
        max_retry_seconds: float = 600.0,
    ) -> None:
        self._queue = queue
        self._notices = notices
        self._transport = transport
        self._clock = clock
        self._poll_seconds = poll_seconds
        self._max_attempts = max_attempts
        self._lease_seconds = lease_seconds
        self._first_retry_seconds = first_retry_seconds
        self._max_retry_seconds = max_retry_seconds
        self._wake = asyncio.Event()
        # Whether notices may wait in user documents. Looking for them searches users (an index
        # on MongoDB, every document on the embedded database), so only when a notice was pended
        # here, and at each poll for those another replica or a crash left.
        self._notices_pended = True
        self._stopping = False

    async def send(self, mail: Mail) -> None:
        await self._queue.enqueue(mail, self._clock.now())
        self._wake.set()

    def wake(self) -> None:
        self._notices_pended = True
        self._wake.set()

    async def run(self) -> None:
        """Move pending notices and deliver due mail until :meth:`stop`; poll so that other
        replicas' mail goes out too."""
        while not self._stopping:
            steps = (self.move_notices, self._deliver_due) if self._notices_pended else (self._deliver_due,)
            self._notices_pended = False  # before the move: a notice pended during it wakes another
            # Apart, so that trouble with one never holds up the other.
            for step in steps:
                try:
                    await step()
                except Exception:
                    # Most likely the database is away; the next poll tries again.
                    log.warning("mail outbox unavailable", exc_info=True)
                    self._notices_pended = True
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_seconds)
            except TimeoutError:
                self._notices_pended = True  # a poll: another replica's or a crash's notices
            self._wake.clear()

    def stop(self) -> None:
        """Make :meth:`run` return once the mail in hand, if any, is delivered and marked.

        Cancelling instead could leave a mail sent but not marked, to be sent again.
        """
        self._stopping = True
        self._wake.set()

    async def move_notices(self) -> None:
        """Move the security notices pended in user documents into the outbox.

        Queueing under the notice's own id makes a repeated move a no-op; the claim is dropped
        only after the copy is queued. So a sender that dies at any step only delays a notice.
        """
        if self._notices is None:
            return
        for _ in range(_NOTICE_BATCHES_PER_PASS):
            if self._stopping:
                return
            pending = await self._notices.claim_pending_notices(self._clock.now(), self._lease_seconds)
            if pending is None:
                return
            for notice in pending.notices:
                await self._queue.enqueue(notice.mail, self._clock.now(), mail_id=notice.id, notice_of=pending.user_id)
            await self._notices.release_notices(pending)
            log.info("notices queued", extra={"user_id": pending.user_id, "count": len(pending.notices)})

    async def _deliver_due(self) -> None:
        while not self._stopping and await self.deliver_next():
            pass

    async def deliver_next(self) -> bool:
        """Try to deliver one due mail; False when none is due."""
        queued = await self._queue.claim(self._clock.now(), self._lease_seconds)
        if queued is None:
            return False
        if self._notices is not None and queued.notice_of is not None:
            # A notice's copy goes out only once the notice waits in no user document, or a
            # sender that died mid-move would leave it to be moved and mailed again.
            now = self._clock.now()
            busy_until = await self._notices.settle_notice(queued.notice_of, queued.id, now)
            if busy_until is not None:
                # Moments, usually (the mover is between queueing and dropping); at most, until a
                # dead mover's claim runs out. Never counted as an attempt.
                await self._queue.postpone(queued.id, min(busy_until, now + _SETTLE_RETRY))
                return True
        try:
            await asyncio.wait_for(self._transport.deliver(queued), timeout=self._lease_seconds / 2)
        except Exception as error:  # noqa: BLE001 - any transport failure means "retry later"
            await self._failed(queued, f"{type(error).__name__}: {error}")
        else:
            await self._queue.delivered(queued.id)
            log.info("mail delivered", extra={"mail_id": queued.id, "attempts": queued.attempts})
        return True

    async def _failed(self, queued: QueuedMail, error: str) -> None:
        if queued.attempts >= self._max_attempts:
            log.error("mail given up", extra={"mail_id": queued.id, "attempts": queued.attempts, "error": error})
            await self._queue.give_up(queued.id, error, self._clock.now())
            return
        delay = min(self._first_retry_seconds * 2 ** (queued.attempts - 1), self._max_retry_seconds)
        log.warning("mail delivery failed", extra={"mail_id": queued.id, "attempts": queued.attempts, "error": error})
        await self._queue.retry_later(queued.id, self._clock.now() + timedelta(seconds=delay), error)
