"""The floor under any gRPC server written on grpcio here: grpcio's stock health servicer alone.

No interceptor, no database, no code of ours: ``grpc.aio`` serving ``grpc.health.v1.Health/Check``
from grpcio-health-checking, in one process or several sharing the port (``SO_REUSEPORT``, as
``serve --workers`` does), driven by ghz exactly as ``python -m bench`` drives our server (32 in
flight on 32 connections, 10 s, twice). Whatever one of our calls does, it cannot be answered
faster than this on the same machine; docs/benchmarks.md reads it beside Keycloak's figures.

    .venv/bin/python -m bench.floor            # 1 and 2 processes
    .venv/bin/python -m bench.floor --workers 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.__main__ import GHZ, free_port, write_protoset

SECONDS = 10
IN_FLIGHT = 32


async def _serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _start(port: int, count: int, started: list[subprocess.Popen[bytes]]) -> None:
    """``count`` serving processes, each added to ``started`` as it starts, so that the caller
    stops every one of them even when waiting for them fails."""
    command = [sys.executable, "-m", "bench.floor", "--serve", str(port)]
    for _ in range(count):
        started.append(subprocess.Popen(command))  # noqa: S603 - this module, with a port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    time.sleep(1)  # every process listening, not only the first


def _calls_per_second(protoset: Path, port: int, seconds: float) -> float:
    output = subprocess.run(  # noqa: S603 - ghz, with arguments built here
        [
            str(GHZ),
            "--insecure",
            "--protoset",
            str(protoset),
            "--call",
            "grpc.health.v1.Health.Check",
            "--data",
            '{"service": ""}',
            "--duration",
            f"{int(seconds * 1000)}ms",
            "--duration-stop",
            "ignore",
            "--concurrency",
            str(IN_FLIGHT),
            "--connections",
            str(IN_FLIGHT),
            "--format",
            "json",
            f"127.0.0.1:{port}",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(output)["rps"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="process counts, in turn (default 1,2)")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="each run (default 10)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # one serving process, on this port
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(_serve(args.serve))
        return
    if not GHZ.exists():
        raise SystemExit(f"bench.floor: {GHZ} is missing: run .ci/setup (or set USERS_BENCH_GHZ)")
    print(f"grpcio's health servicer alone; {os.cpu_count()} cores; {IN_FLIGHT} in flight, {args.seconds:g} s a run")
    with tempfile.TemporaryDirectory(prefix="users-floor-") as directory:
        protoset = Path(directory) / "contracts.protoset"
        write_protoset(protoset)
        for count in (int(part) for part in args.workers.split(",")):
            port = free_port()
            processes: list[subprocess.Popen[bytes]] = []
            try:
                _start(port, count, processes)
                runs = [_calls_per_second(protoset, port, args.seconds) for _ in range(2)]
            finally:
                for process in processes:
                    process.terminate()
                    process.wait()
            print(f"processes {count}: " + ", ".join(f"{rate:,.0f}" for rate in runs) + " calls/s")


if __name__ == "__main__":
    main()
