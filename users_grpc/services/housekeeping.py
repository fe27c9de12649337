"""Housekeeping: delete what the service no longer needs, by one replica at a time.

Every replica wakes every interval and tries to take the job's lease (one
conditional update on the ``leases`` collection). The one that takes it holds
it for the whole interval and purges:

- sessions that expired or were revoked more than the session retention ago;
- accounts never activated, created more than the unactivated-account
  retention ago, which frees their username and email;
- mail given up (status "failed") more than the failed-mail retention ago;
- throttle tallies past their use (each carries its own expiry);
- claims on usernames and emails left pending by a write that never finished
  (see :class:`users_grpc.adapters.mongo.claims.MongoClaims`);
- audit events older than the audit retention (FerretDB has no TTL indexes);
- changes of the change feed published more than the change retention ago
  (always the oldest ones, and never the newest: see ``MongoChangeLog``).

Holding the lease for a whole interval makes the job run about once per
interval whatever the number of replicas; a run is cut off before its lease
ends, so two never overlap. Each purge is served by an index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

from users_grpc.domain.ports import Clock, Housekeeping

log = logging.getLogger(__name__)

JOB = "housekeeping"


@dataclass(frozen=True, kw_only=True)
class Retention:
    ended_sessions: timedelta
    never_activated_accounts: timedelta
    failed_mail: timedelta
    audit_events: timedelta = timedelta(days=365)
    changes: timedelta = timedelta(days=7)


@dataclass(frozen=True)
class Purged:
    sessions: int
    accounts: int
    mails: int
    tallies: int = 0
    claims: int = 0
    audit_events: int = 0
    changes: int = 0
    passkey_ceremonies: int = 0


def holder_id() -> str:
    """Who holds a lease: readable for an operator, unique per process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class HousekeepingJob:
    def __init__(
        self,
        *,
        store: Housekeeping,
        clock: Clock,
        retention: Retention,
        interval_seconds: float,
        holder: str | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._retention = retention
        self._interval_seconds = interval_seconds
        self.holder = holder or holder_id()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Run once now and then every interval, until :meth:`stop`."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self.run_once(), timeout=self._interval_seconds * 0.9)
            except TimeoutError:
                log.warning("housekeeping cut off at the end of its lease")
            except Exception:
                # Most likely the database is away; the next interval tries again.
                log.warning("housekeeping failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_seconds)

    def stop(self) -> None:
        self._stopping.set()

    async def run_once(self) -> Purged | None:
        """Purge, if this replica takes the lease; None if another replica holds it."""
        now = self._clock.now()
        if not await self._store.take_lease(JOB, self.holder, now, self._interval_seconds):
            return None
        purged = Purged(
            sessions=await self._store.purge_ended_sessions(now - self._retention.ended_sessions),
            accounts=await self._store.purge_never_activated_users(now - self._retention.never_activated_accounts),
            mails=await self._store.purge_failed_mail(now - self._retention.failed_mail),
            tallies=await self._store.purge_expired_tallies(now),
            claims=await self._store.release_stale_claims(now),
            audit_events=await self._store.purge_audit_events(now - self._retention.audit_events),
            changes=await self._store.purge_changes(now - self._retention.changes),
            passkey_ceremonies=await self._store.purge_expired_ceremonies(now),
        )
        if purged != Purged(0, 0, 0):
            log.info("housekeeping purged", extra=dataclasses.asdict(purged))
        return purged
