"""The Prometheus metrics an operator sees (served over HTTP by the HTTP edge, users_grpc/http_api,
when ``USERS_HTTP_ADDRESS`` is set): the calls' (counted by the pipeline's observation step,
pipeline/observation.py, on both edges) and the values read at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

http_log = logging.getLogger(__name__)

SIGN_IN_METHODS = frozenset({"Authenticate", "VerifyCredentials", "IssueServiceToken"})
THROTTLE_REASONS = frozenset({"TOO_MANY_ATTEMPTS", "RATE_LIMITED"})


@dataclass(frozen=True)
class OutboxState:
    pending: int
    failed: int
    oldest_pending_at: datetime | None


@dataclass(frozen=True)
class Gauges:
    """Where the values read at scrape time come from."""

    hash_jobs: Callable[[], int]
    hash_capacity: int
    streams_open: Callable[[], int]
    signing_key_created_at: Callable[[], datetime | None]
    database_up: Callable[[], bool | None]
    outbox: Callable[[], Awaitable[OutboxState]]
    now: Callable[[], datetime]


class Metrics:
    """One server's metrics, in a registry of its own (so servers in one process do not collide).

    ``shared``: one worker of several (``users-grpc serve --workers N``). Its counts go to files in
    PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, switched on by the supervisor
    before the worker started) and the page shows the sum over every worker, live and dead; the
    values read at scrape time (hashing, streams, the database) are the answering worker's own.
    """

    def __init__(self, *, shared: bool = False) -> None:
        # The page's registry; a shared worker's metrics go to files, read back by the collector.
        self.registry = CollectorRegistry()
        registry = self.registry
        if shared:
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
            registry = CollectorRegistry()  # registered nowhere the page reads: the files are the truth
        self._calls = Counter(
            "users_grpc_calls", "UserService calls handled, by method and status code", ["method", "code"],
            registry=registry,
        )  # fmt: skip
        self._duration = Histogram(
            "users_grpc_call_duration_seconds",
            "UserService call latency, refusals included",
            ["method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.in_progress = Gauge(
            "users_grpc_calls_in_progress",
            "UserService unary calls in progress",
            registry=registry,
            multiprocess_mode="livesum",  # of the workers alive: a dead one's calls ended with it
        )
        self._refusals = Counter(
            "users_grpc_refusals", "Calls refused, by method and ErrorInfo reason", ["method", "reason"],
            registry=registry,
        )  # fmt: skip
        self._sign_in_failures = Counter(
            "users_grpc_sign_in_failures",
            "Refused sign-ins (Authenticate, VerifyCredentials, IssueServiceToken), by method and reason",
            ["method", "reason"],
            registry=registry,
        )
        self._throttle_holds = Counter(
            "users_grpc_throttle_holds",
            "Calls held back by a throttle: TOO_MANY_ATTEMPTS (password or code delays) or RATE_LIMITED (per source)",
            ["method", "reason"],
            registry=registry,
        )
        self._database_errors = Counter(
            "users_grpc_database_errors",
            "Calls that failed because the database was unreachable or too slow (STORAGE_UNAVAILABLE)",
            ["method"],
            registry=registry,
        )
        self.hash_wait = Histogram(
            "users_grpc_hash_wait_seconds",
            "Time a password hashing job waited for a worker",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self._scraped: _ScrapeTimeGauges | None = None
        # The page is rendered in a thread of its own, never on the event loop that serves gRPC
        # (a render takes milliseconds); scrapes that arrive while one is rendered share it, so a
        # flood of scrapers costs at most one render at a time.
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")
        self._rendering: asyncio.Future[bytes] | None = None
        # Scrapes waiting for the page being rendered (seen by the tests).
        self.scrapes_waiting = 0
        # Children by label values: a call costs dictionary look-ups, not the library's label checks.
        self._call_children: dict[tuple[str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}

    def read_at_scrape(self, gauges: Gauges) -> None:
        """Report these values too, read when scraped."""
        self._scraped = _ScrapeTimeGauges(gauges)
        self.registry.register(self._scraped)

    def observe(self, method: str, code: str, seconds: float | None, reason: str | None) -> None:
        """Count a call that ended (``code`` the status code's name); its duration too, unless
        ``seconds`` is None (a stream)."""
        calls = self._call_children.get((method, code))
        if calls is None:
            calls = self._call_children[method, code] = self._calls.labels(method, code)
        calls.inc()
        if seconds is not None:
            duration = self._duration_children.get(method)
            if duration is None:
                duration = self._duration_children[method] = self._duration.labels(method)
            duration.observe(seconds)
        if reason is not None:
            self._refused(method, reason)

    def _refused(self, method: str, reason: str) -> None:
        self._refusals.labels(method, reason).inc()
        if method in SIGN_IN_METHODS:
            self._sign_in_failures.labels(method, reason).inc()
        if reason in THROTTLE_REASONS:
            self._throttle_holds.labels(method, reason).inc()
        if reason == "STORAGE_UNAVAILABLE":
            self._database_errors.labels(method).inc()

    async def exposition(self) -> bytes:
        """The page, rendered off the loop; shared with every scrape that asks while it renders."""
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render())
            self._rendering.add_done_callback(self._rendered)
        self.scrapes_waiting += 1
        try:
            # Shielded: one scraper leaving does not cancel the page the others wait for.
            return await asyncio.shield(self._rendering)
        finally:
            self.scrapes_waiting -= 1

    async def _render(self) -> bytes:
        if self._scraped is not None:
            await self._scraped.refresh()
        families = _YieldingBetweenFamilies(self.registry)
        return await asyncio.get_running_loop().run_in_executor(self._renderer, generate_latest, families)

    def _rendered(self, rendering: asyncio.Future[bytes]) -> None:
        self._rendering = None
        if not rendering.cancelled() and rendering.exception() is not None:
            # Every scraper may have left: the failure is logged here, never as an unretrieved exception.
            http_log.warning("could not render the metrics", exc_info=rendering.exception())

    def close(self) -> None:
        self._renderer.shutdown(wait=False, cancel_futures=True)


class _YieldingBetweenFamilies:
    """The registry's metrics, handing the GIL on after each family is rendered.

    The render thread holds the GIL while it formats, and the loop thread would wait up to
    the interpreter's switch interval (5 ms) for it each time; ``sleep(0)`` lets the loop run
    between families instead. Measured with a 75 KB page and eight scraping processes, a
    GetPublicKeys call took 4-8 ms (median; 30-37 ms p90) without it, under 1 ms (5-6 ms) with it.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            yield family
            time.sleep(0)


class _ScrapeTimeGauges(Collector):
    """Values read when Prometheus scrapes: nothing is kept up to date between scrapes."""

    # Scrapers of several Prometheus servers share one reading of the outbox for this long.
    OUTBOX_CACHE_SECONDS = 5.0

    def __init__(self, gauges: Gauges) -> None:
        self._gauges = gauges
        self._outbox: OutboxState | None = None
        self._outbox_read_at = float("-inf")
        self._families: list[GaugeMetricFamily] = []

    async def refresh(self) -> None:
        """Read the values, on the event loop: the page is rendered in another thread, and the
        values come from objects only the loop may touch (a dictionary it changes, say)."""
        if time.monotonic() - self._outbox_read_at >= self.OUTBOX_CACHE_SECONDS:
            try:
                self._outbox = await self._gauges.outbox()
            except Exception:  # noqa: BLE001 - a scrape reports what it can; the gauge goes missing
                self._outbox = None
                http_log.warning("could not read the outbox for metrics", exc_info=True)
            self._outbox_read_at = time.monotonic()
        self._families = list(self._read())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families)

    def _read(self) -> Iterator[GaugeMetricFamily]:
        gauges = self._gauges
        now = gauges.now()
        yield GaugeMetricFamily(
            "users_grpc_hash_jobs", "Password hashing jobs running or waiting for a worker", value=gauges.hash_jobs()
        )
        yield GaugeMetricFamily(
            "users_grpc_hash_capacity",
            "Hashing jobs that may run or wait at once (USERS_HASH_WORKERS + USERS_HASH_QUEUE_LENGTH); "
            "past it calls are refused OVERLOADED",
            value=gauges.hash_capacity,
        )
        yield GaugeMetricFamily(
            "users_grpc_streams_open",
            "WatchUserChanges streams admitted and open (USERS_MAX_STREAMS caps them)",
            value=gauges.streams_open(),
        )
        created = gauges.signing_key_created_at()
        if created is not None:
            yield GaugeMetricFamily(
                "users_grpc_signing_key_age_seconds",
                "Age of the key that signs access tokens now",
                value=(now - created).total_seconds(),
            )
        up = gauges.database_up()
        if up is not None:
            yield GaugeMetricFamily(
                "users_grpc_database_up", "1 if the last health check reached the database", value=int(up)
            )
        outbox = self._outbox
        if outbox is not None:
            yield GaugeMetricFamily("users_grpc_outbox_pending", "Mail waiting to be delivered", value=outbox.pending)
            yield GaugeMetricFamily(
                "users_grpc_outbox_failed", "Mail given up, kept for inspection until housekeeping", value=outbox.failed
            )
            oldest = 0.0 if outbox.oldest_pending_at is None else (now - outbox.oldest_pending_at).total_seconds()
            yield GaugeMetricFamily(
                "users_grpc_outbox_oldest_pending_age_seconds",
                "How long the oldest mail still waiting has waited (0 when none waits)",
                value=max(0.0, oldest),
            )
