"""Health: readiness that follows the database, and liveness that does not.

Readiness (the service names ``""`` and ``users.v1.UserService``) is SERVING while the
database answers and NOT_SERVING while it does not, or before the server has prepared it:
a load balancer or readiness probe sends no calls then. Liveness (the name ``liveness``) is
SERVING as long as the process answers at all: a liveness probe on it never restarts a pod
because the database blipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from grpc_health.v1 import health_pb2

# The public name is grpc_health.v1.health.aio, which the type stubs do not declare.
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"


class DatabaseHealth:
    def __init__(
        self,
        *,
        servicer: AsyncHealthServicer,
        services: Sequence[str],
        ping: Callable[[], Awaitable[bool]],
        interval_seconds: float,
    ) -> None:
        self._servicer = servicer
        self._services = services
        self._ping = ping
        self._interval = interval_seconds
        self._serving: bool | None = None
        self._stopping = asyncio.Event()

    @property
    def serving(self) -> bool | None:
        """Whether the last check reached the database; None before the first."""
        return self._serving

    async def starting(self) -> None:
        """Before the database is prepared: alive, not ready."""
        await self._servicer.set(LIVENESS, SERVING)
        await self._publish(NOT_SERVING)

    async def check(self) -> bool:
        """Ping once and publish the result; True if the database answered."""
        serving = await self._ping()
        if serving != self._serving:
            log.log(logging.INFO if serving else logging.WARNING, "database %s", "up" if serving else "down")
            self._serving = serving
        await self._publish(SERVING if serving else NOT_SERVING)
        return serving

    async def _publish(self, status: int) -> None:
        for service in self._services:
            await self._servicer.set(service, status)

    async def run(self) -> None:
        """Check every interval until :meth:`stop`."""
        while not self._stopping.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval)

    def stop(self) -> None:
        self._stopping.set()
