"""Health that follows the database: SERVING while it answers, NOT_SERVING while it does not."""

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

    async def check(self) -> bool:
        """Ping once and publish the result; True if the database answered."""
        serving = await self._ping()
        if serving != self._serving:
            log.log(logging.INFO if serving else logging.WARNING, "database %s", "up" if serving else "down")
            self._serving = serving
        for service in self._services:
            await self._servicer.set(service, SERVING if serving else NOT_SERVING)
        return serving

    async def run(self) -> None:
        """Check every interval until :meth:`stop`."""
        while not self._stopping.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval)

    def stop(self) -> None:
        self._stopping.set()
