"""The supervisor's restart rule (users_grpc/workers.py), with stand-ins for dead processes.

The real processes, ports and signals are tests/e2e/test_workers.py's; a worker that keeps dying
before it serves takes the backoff's 15 seconds there, so its rule is checked here.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

import pytest

from users_grpc.config import Settings
from users_grpc.workers import MAX_FAILED_STARTS, Supervisor, WorkersFailed, _Worker, default_workers


class DeadProcess:
    """A worker process that has exited with ``exitcode``."""

    def __init__(self, pid: int, exitcode: int) -> None:
        self.pid = pid
        self.exitcode = exitcode

    def join(self, timeout: float | None = None) -> None:
        pass


def _dies(supervisor: Supervisor, worker: _Worker, pid: int, *, served: bool, exitcode: int = 1) -> None:
    worker.process = DeadProcess(pid, exitcode)  # type: ignore[assignment]
    worker.serving = served
    supervisor._exited(worker)


def _backoffs(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [record.restart_in_seconds for record in caplog.records if record.message == "worker exited; restarting"]  # type: ignore[attr-defined]


def test_a_worker_dying_before_it_serves_waits_longer_each_time_then_ends_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="users_grpc.workers")
    supervisor = Supervisor(Settings(workers=2))
    worker = _Worker(0)
    for pid in range(MAX_FAILED_STARTS):
        _dies(supervisor, worker, 100 + pid, served=False)
    assert _backoffs(caplog) == [1.0, 2.0, 4.0, 8.0]
    with pytest.raises(WorkersFailed, match=f"worker 0 died {MAX_FAILED_STARTS} times in a row before serving"):
        supervisor._stop_all()


def test_a_worker_that_served_is_restarted_soon_however_often_it_died_before(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="users_grpc.workers")
    supervisor = Supervisor(Settings(workers=2))
    worker = _Worker(1)
    _dies(supervisor, worker, 200, served=False)
    _dies(supervisor, worker, 201, served=False)
    worker.reports, report = multiprocessing.Pipe(duplex=False)
    report.send(("serving", ""))  # what a worker says once it serves (workers._work)
    supervisor._read_reports(worker)
    _dies(supervisor, worker, 202, served=worker.serving, exitcode=-9)
    assert _backoffs(caplog) == [1.0, 2.0, 0.5]
    assert caplog.records[-1].signal == "SIGKILL"  # type: ignore[attr-defined]
    assert supervisor._stop_all() == 0


def test_the_default_is_one_worker_per_core_this_process_may_use() -> None:
    assert default_workers() == len(os.sched_getaffinity(0))
