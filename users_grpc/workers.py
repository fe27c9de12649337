"""``users-grpc serve --workers N``: N worker processes serving one address, supervised.

One Python process runs on one core (the GIL); this is how the server uses the others. It is
the pattern of grpc's own example (examples/python/multiprocessing/server.py): each worker is a
whole server (its event loop, gRPC server, HTTP edge, database client) listening with
SO_REUSEPORT on the same port, and the kernel spreads new connections over the workers. They are
forked before this process makes any gRPC object: gRPC's core does not survive a fork once it runs.

This process, the supervisor, serves nothing itself. It

- reserves each address first: a bind without SO_REUSEPORT proves nobody holds it, so a second
  server started by mistake fails with one sentence instead of silently taking half the calls;
  then a bound, never listening, SO_REUSEPORT socket keeps the port (port 0 resolved here, for
  the tests) while the workers run, so no other server takes it while a worker restarts;
- restarts a worker that dies, after a backoff that grows while it keeps dying before it serves,
  and gives up (exit 1) after :data:`MAX_FAILED_STARTS` such deaths in a row;
- ends the whole server, saying it once (exit 2), on a start-up error a worker meets (a missing
  key, a broken template: a :class:`ConfigError`), which every worker would meet again;
- on SIGTERM or SIGINT stops every worker, each draining as a lone server does
  (USERS_SHUTDOWN_DELAY_SECONDS, USERS_SHUTDOWN_GRACE_SECONDS), and exits 0.

Metrics are prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR); docs/operations.md
says what a scrape and a probe see.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from users_grpc.bootstrap import serve
from users_grpc.config import Settings, cores
from users_grpc.domain.errors import ConfigError

log = logging.getLogger(__name__)

# Deaths before serving, in a row, after which a worker is not started again.
MAX_FAILED_STARTS = 5
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
_SERVING = "serving"
_CONFIG_ERROR = "config error"
_PR_SET_PDEATHSIG = 1


class WorkersFailed(RuntimeError):
    """A worker kept dying before it served: restarting it again would not help."""


def default_workers() -> int:
    """One worker per core this process may use."""
    return cores()


def serve_in_workers(settings: Settings) -> int:
    """Serve with ``settings.workers`` processes until SIGTERM or SIGINT; the exit status.

    Raises :class:`ConfigError` for an address taken or a start-up error a worker met, and
    :class:`WorkersFailed` when a worker keeps dying before it serves."""
    with _reserved(settings) as resolved, _shared_metrics(resolved):
        return Supervisor(resolved).run()


@contextlib.contextmanager
def _reserved(settings: Settings) -> Iterator[Settings]:
    """The settings with each address's port resolved, held for as long as the workers run."""
    held: list[socket.socket] = []
    try:
        grpc_address = _reserve(settings.grpc_address, "USERS_GRPC_ADDRESS", held)
        http_address = None
        if settings.http_address is not None:
            http_address = _reserve(settings.http_address, "USERS_HTTP_ADDRESS", held)
        yield dataclasses.replace(settings, grpc_address=grpc_address, http_address=http_address)
    finally:
        for sock in held:
            sock.close()


def _reserve(address: str, variable: str, held: list[socket.socket]) -> str:
    host, _, port = address.rpartition(":")
    try:
        family, sockaddr, dual_stack = _socket_address(host, int(port))
        # Not shareable: fails if any socket, shared or not, is bound or listening there.
        with _bound(family, sockaddr, dual_stack=dual_stack, reuse_address=True, reuse_port=False) as probe:
            resolved = probe.getsockname()[1]
        sockaddr = (sockaddr[0], resolved, *sockaddr[2:])
        try:
            # Without SO_REUSEADDR, so another server's probe fails on it even while no worker listens.
            reservation = _bound(family, sockaddr, dual_stack=dual_stack, reuse_address=False, reuse_port=True)
        except OSError:
            # Connections of an earlier server still in TIME_WAIT on the port: then the workers'
            # listening sockets are what keeps another server out.
            reservation = _bound(family, sockaddr, dual_stack=dual_stack, reuse_address=True, reuse_port=True)
    except OSError as error:
        raise ConfigError(
            f"{variable}={address}: cannot listen there ({error.strerror}); "
            "is another server using the port, or is the address not this machine's?"
        ) from None
    held.append(reservation)
    return f"{host}:{resolved}"


def _socket_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...], bool]:
    bare = host.strip("[]")
    if bare == "::" and socket.has_dualstack_ipv6():
        return socket.AF_INET6, ("::", port, 0, 0), True  # IPv4 too, as gRPC binds it
    if bare == "::":
        return socket.AF_INET, ("0.0.0.0", port), False  # noqa: S104 - "[::]" asks for every interface
    family, _, _, _, sockaddr = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, sockaddr, False


def _bound(
    family: socket.AddressFamily,
    sockaddr: tuple[Any, ...],
    *,
    dual_stack: bool,
    reuse_address: bool,
    reuse_port: bool,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _shared_metrics(settings: Settings) -> Iterator[None]:
    """PROMETHEUS_MULTIPROC_DIR for the workers' metrics files: the one given, emptied (a previous
    run's counts are not this server's), or a directory of our own, removed at the end."""
    if settings.http_address is None:
        yield  # no /metrics, no metrics kept
        return
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="users-grpc-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass(eq=False)
class _Worker:
    """One place among the N: the process in it now, and how its starts have gone."""

    index: int
    process: BaseProcess | None = None
    reports: Connection | None = None
    serving: bool = False
    failed_starts: int = 0
    start_at: float = 0.0


@dataclass
class Supervisor:
    settings: Settings
    _workers: list[_Worker] = field(default_factory=list)
    _stopping: bool = False
    _config_error: str | None = None
    _failed: str | None = None

    def run(self) -> int:
        """Start the workers, keep them running until a signal, stop them; the exit status."""
        context = multiprocessing.get_context("fork")
        wakeup_read, wakeup_write = socket.socketpair()
        wakeup_read.setblocking(False)
        wakeup_write.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(wakeup_write.fileno())
        previous = {signum: signal.signal(signum, self._stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        self._workers = [_Worker(index) for index in range(self.settings.workers)]
        # Said at debug: a start that fails says one sentence only (start-up errors are one line).
        log.debug(
            "starting workers",
            extra={"workers": self.settings.workers, "address": self.settings.grpc_address},
        )
        try:
            while not self._stopping:
                self._start_due(context, wakeup=(wakeup_read, wakeup_write))
                self._wait(wakeup_read)
            return self._stop_all()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            wakeup_read.close()
            wakeup_write.close()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start_due(self, context: multiprocessing.context.BaseContext, *, wakeup: tuple[socket.socket, ...]) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if worker.process is None and worker.start_at <= now:
                reports, report_to = context.Pipe(duplex=False)
                process = context.Process(  # type: ignore[attr-defined]
                    target=_work,
                    args=(self.settings, worker.index, report_to, os.getpid(), wakeup),
                    name=f"users-grpc worker {worker.index}",
                )
                process.start()
                report_to.close()
                worker.process, worker.reports, worker.serving = process, reports, False
                log.debug("worker started", extra={"worker": worker.index, "pid": process.pid})

    def _wait(self, wakeup: socket.socket) -> None:
        running = [worker for worker in self._workers if worker.process is not None]
        waiting = [worker.start_at for worker in self._workers if worker.process is None]
        timeout = max(0.0, min(waiting) - time.monotonic()) if waiting else None
        sentinels = {worker.process.sentinel: worker for worker in running if worker.process is not None}
        reports = {worker.reports: worker for worker in running if worker.reports is not None}
        ready = wait([wakeup, *sentinels, *reports], timeout)
        if wakeup in ready:
            with contextlib.suppress(BlockingIOError):
                wakeup.recv(512)
        for item in ready:
            if item in reports:
                self._read_reports(reports[item])
        for item in ready:
            if item in sentinels:
                self._exited(sentinels[item])

    def _read_reports(self, worker: _Worker) -> None:
        reports = worker.reports
        with contextlib.suppress(EOFError, OSError):
            while reports is not None and reports.poll():
                kind, detail = reports.recv()
                if kind == _SERVING:
                    worker.serving, worker.failed_starts = True, 0
                    pid = worker.process.pid if worker.process is not None else None
                    log.info("worker serving", extra={"worker": worker.index, "pid": pid})
                elif kind == _CONFIG_ERROR and self._config_error is None:
                    self._config_error, self._stopping = detail, True

    def _exited(self, worker: _Worker) -> None:
        process = worker.process
        assert process is not None
        process.join()
        self._read_reports(worker)  # what it said before it died
        if worker.reports is not None:
            worker.reports.close()
        worker.process, worker.reports = None, None
        _forget_live_gauges(process.pid)
        if self._stopping:
            return
        worker.failed_starts += 0 if worker.serving else 1
        if worker.failed_starts >= MAX_FAILED_STARTS:
            self._failed = f"worker {worker.index} died {worker.failed_starts} times in a row before serving"
            self._stopping = True
            return
        backoff = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2**worker.failed_starts)
        worker.start_at = time.monotonic() + backoff
        how = {**_how(process), "worker": worker.index, "pid": process.pid, "restart_in_seconds": backoff}
        log.warning("worker exited; restarting", extra=how)

    def _stop_all(self) -> int:
        """SIGTERM to each worker, as to a lone server; each drains within its settings."""
        if self._config_error is None:
            log.info("stopping workers")
        running = [worker for worker in self._workers if worker.process is not None]
        for worker in running:
            if worker.process is not None and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        settings = self.settings
        # What a worker's drain may take (bootstrap App.stop), and a margin.
        deadline = time.monotonic() + settings.shutdown_delay_seconds + settings.shutdown_grace_seconds
        deadline += settings.smtp_timeout_seconds + 5
        clean = True
        for worker in running:
            process = worker.process
            assert process is not None
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker did not stop in time; killed", extra={"worker": worker.index, "pid": process.pid})
                process.kill()
                process.join()
                clean = False
            if worker.reports is not None:
                self._read_reports(worker)
                worker.reports.close()
        if self._config_error is not None:
            raise ConfigError(self._config_error)
        if self._failed is not None:
            raise WorkersFailed(f"{self._failed}; its log lines above say why")
        log.info("stopped")
        return 0 if clean else 1


def _how(process: BaseProcess) -> dict[str, object]:
    code = process.exitcode
    if code is not None and code < 0:
        return {"signal": signal.Signals(-code).name}
    return {"exit_code": code}


def _forget_live_gauges(pid: int | None) -> None:
    """A dead worker's calls in progress are not in progress (its counts stay counted)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory is not None and pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _work(
    settings: Settings, index: int, report: Connection, parent: int, inherited: tuple[socket.socket, ...]
) -> None:
    """A worker: one whole server on the shared port, telling the supervisor how it goes."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    for sock in inherited:
        sock.close()
    _die_with(parent)
    fields = _WorkerFields(index)
    for handler in logging.getLogger().handlers:
        handler.addFilter(fields)
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import values

        # Chosen when prometheus_client was imported, before the supervisor set the directory.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    try:
        asyncio.run(serve(settings, share_port=True, on_serving=lambda: report.send((_SERVING, ""))))
    except ConfigError as error:
        # Said by the supervisor, once for all the workers.
        report.send((_CONFIG_ERROR, str(error)))
        sys.exit(2)


def _die_with(parent: int) -> None:
    """SIGTERM when the supervisor dies, even by SIGKILL: never a worker left serving alone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class _WorkerFields(logging.Filter):
    """Which worker wrote a line: its place (0 to N-1) and its process id."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self._index = index
        self._pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._index
        record.pid = self._pid
        return True
