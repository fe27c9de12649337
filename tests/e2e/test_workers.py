"""``users-grpc serve --workers N``: N processes on one address, supervised (users_grpc/workers.py).

One server of two workers for the module, real processes on port 0, real channels: it is started
once (a worker process costs a second of the two cores) and stopped by the last test.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.support.calls import SERVING, ServeProcess, health_stub, wait_until
from tests.support.paths import REPO_ROOT
from tests.support.servers import KEY_ENCRYPTION_KEY
from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc

SERVICE = "users.v1.UserService"
WORKERS = 2


def _pids(serve: ServeProcess, message: str) -> set[int]:
    return {int(record["pid"]) for record in serve.logged(message) if "worker" in record}


@pytest.fixture(scope="module")
def workers(mongodb_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(
        USERS_WORKERS=str(WORKERS),
        USERS_HTTP_ADDRESS="127.0.0.1:0",
        USERS_MONGODB_URI=mongodb_uri,
        USERS_MONGODB_DATABASE="workers",
        USERS_MAIL_DIR=str(tmp_path_factory.mktemp("mail")),
        USERS_BCRYPT_ROUNDS="10",
    )
    try:
        # Every worker says it serves (after its database is prepared): no sleep, no guess.
        wait_until(lambda: len(_pids(serve, "serving")) == WORKERS, timeout=60, what="both workers serving")
        yield serve
    finally:
        if serve.process.poll() is None:
            serve.process.send_signal(signal.SIGTERM)
            serve.process.wait(timeout=60)
        serve.close()


def _addresses(serve: ServeProcess) -> tuple[str, str]:
    listening = serve.logged("listening")[0]
    return f"127.0.0.1:{listening['port']}", f"127.0.0.1:{listening['http_port']}"


def _calls_counted(http_address: str, method: str) -> float:
    with urllib.request.urlopen(f"http://{http_address}/metrics", timeout=10) as response:
        body = response.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "users_grpc_calls_total" and sample.labels == {"method": method, "code": "OK"}:
                return sample.value
    return 0.0


def test_every_worker_answers_and_one_scrape_counts_the_calls_of_all(workers: ServeProcess) -> None:
    grpc_address, http_address = _addresses(workers)
    # Each new channel is a new connection, which the kernel hands to one of the workers:
    # call until both have answered (the chance that 200 connections all reach one is 2^-199).
    calls = 0
    while len({int(r["pid"]) for r in workers.logged("rpc")}) < WORKERS:
        assert calls < 200, "only one worker answered"
        # A subchannel pool of its own: never the connection an earlier channel left open.
        with grpc.insecure_channel(grpc_address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            user_service_pb2_grpc.UserServiceStub(channel).GetPublicKeys(pb.GetPublicKeysRequest(), timeout=10)
        calls += 1
    assert calls >= WORKERS
    # Counted before each reply went out; a scrape answered by either worker shows them all.
    assert _calls_counted(http_address, "GetPublicKeys") == calls


def test_a_worker_that_dies_is_restarted_and_said_so(workers: ServeProcess) -> None:
    grpc_address, _ = _addresses(workers)
    killed = min(_pids(workers, "serving"))
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: len(_pids(workers, "serving") - {killed}) == WORKERS, timeout=60, what="a new worker serving")
    [exited] = [record for record in workers.logged("worker exited; restarting") if record["pid"] == killed]
    assert exited["level"] == "warning"
    assert exited["signal"] == "SIGKILL"
    with grpc.insecure_channel(grpc_address) as channel:
        reply = health_stub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert reply.status == SERVING


def _serve(env: dict[str, str], mongodb_uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "users_grpc", "serve", "--workers", str(WORKERS)],
        env={
            **os.environ,
            "USERS_GRPC_ADDRESS": "127.0.0.1:0",
            "USERS_MONGODB_URI": mongodb_uri,
            "USERS_KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(KEY_ENCRYPTION_KEY).decode(),
            **env,
        },
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("edge", ["USERS_GRPC_ADDRESS", "USERS_HTTP_ADDRESS"])
def test_an_address_another_server_of_workers_holds_is_one_clear_error(
    workers: ServeProcess, mongodb_uri: str, edge: str
) -> None:
    """Not a second set of workers splitting the port with the first (SO_REUSEPORT would let it).
    A port a lone server holds is test_operations.py's and test_observability.py's busy address."""
    grpc_address, http_address = _addresses(workers)
    taken = grpc_address if edge == "USERS_GRPC_ADDRESS" else http_address
    result = _serve({edge: taken, **({} if edge == "USERS_HTTP_ADDRESS" else {"USERS_HTTP_ADDRESS": ""})}, mongodb_uri)
    assert result.returncode == 2
    assert result.stderr.count("cannot listen there") == 1
    assert f"{edge}={taken}: cannot listen there" in result.stderr
    assert "Traceback" not in result.stderr
    assert "worker started" not in result.stderr


def test_a_bad_setting_found_by_the_workers_is_said_once(mongodb_uri: str, tmp_path: Path) -> None:
    # Found only as a worker builds its server (the parent makes no gRPC object): said once, not once a worker.
    result = _serve({"USERS_KEY_ENCRYPTION_KEY": "", "USERS_MAIL_DIR": str(tmp_path)}, mongodb_uri)
    assert result.returncode == 2
    assert result.stderr.count("USERS_KEY_ENCRYPTION_KEY is required") == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one sentence, as from a lone server
    assert "users-grpc: USERS_KEY_ENCRYPTION_KEY is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_drains_every_worker_and_the_parent_exits_0(workers: ServeProcess) -> None:
    """Last in the module: it stops the module's server."""
    serving = _pids(workers, "serving")
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=60) == 0
    live = serving - _pids(workers, "worker exited; restarting")
    assert live <= _pids(workers, "shutting down")
    assert live <= _pids(workers, "stopped")
    assert len(live) == WORKERS
    assert not any("Traceback" in line for line in workers.lines)
