"""Benchmark: do cheap RPCs keep flowing while the server hashes passwords?

Starts FerretDB, an SMTP sink and the server (bcrypt cost 12, as in production),
then measures GetUser latency idle, and again while clients keep VerifyCredentials
(one bcrypt check each) busy. Prints the figures and the loaded/idle ratios.

    .venv/bin/python -m tests.benchmarks.hashing_load [--seconds 10] [--hashers 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.support.database import start_ferretdb
from tests.support.mail import MailSink, SocketController
from tests.support.servers import ADMIN_PASSWORD, RunningServer, make_settings
from users.v1 import user_service_pb2 as pb


def latencies(call: Callable[[], object], seconds: float) -> list[float]:
    """Call repeatedly for ``seconds``; the latency of each call, in milliseconds."""
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hashers", type=int, default=8, help="concurrent VerifyCredentials clients")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        database = start_ferretdb(Path(directory))
        sink = MailSink()
        smtp = SocketController(sink)
        smtp.start()
        settings = dataclasses.replace(
            make_settings(database.uri, f"bench_{uuid.uuid4().hex[:8]}", smtp.port), bcrypt_rounds=12
        )
        server = RunningServer(settings, clock=None)
        try:
            get = pb.GetUserRequest(id=server.admin_id)
            verify = pb.VerifyCredentialsRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
            for _ in range(20):  # warm up connections and caches
                server.stub.GetUser(get)
            idle = latencies(lambda: server.stub.GetUser(get), args.seconds)

            stop = threading.Event()
            hashed = [0] * args.hashers

            def hash_forever(slot: int) -> None:
                while not stop.is_set():
                    server.stub.VerifyCredentials(verify)
                    hashed[slot] += 1

            threads = [threading.Thread(target=hash_forever, args=(n,)) for n in range(args.hashers)]
            for thread in threads:
                thread.start()
            time.sleep(1)  # let the hashing queue fill
            counted_from = sum(hashed)
            loaded = latencies(lambda: server.stub.GetUser(get), args.seconds)
            verifications = (sum(hashed) - counted_from) / args.seconds
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            server.stop()
            smtp.stop()
            database.stop()

    idle_p50, idle_p99 = summary(idle)
    loaded_p50, loaded_p99 = summary(loaded)
    print(f"GetUser idle:    {len(idle):6d} calls  p50 {idle_p50:7.2f} ms  p99 {idle_p99:7.2f} ms")
    print(f"GetUser loaded:  {len(loaded):6d} calls  p50 {loaded_p50:7.2f} ms  p99 {loaded_p99:7.2f} ms")
    print(f"VerifyCredentials alongside: {verifications:.1f}/s from {args.hashers} clients (bcrypt cost 12)")
    print(f"ratio loaded/idle: p50 {loaded_p50 / idle_p50:.2f}x  p99 {loaded_p99 / idle_p99:.2f}x")


if __name__ == "__main__":
    main()
