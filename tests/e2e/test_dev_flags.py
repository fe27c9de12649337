"""`users-grpc dev`'s address flags: they place the service and its HTTP endpoint, and a port
another process holds is named in one sentence with the flag that moves it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import HARNESS, REPO_ROOT


def dev(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "USERS_DEV_DB_BINARY": str(HARNESS)}
    for name in ("USERS_KEY_ENCRYPTION_KEY", "USERS_GRPC_ADDRESS", "USERS_HTTP_ADDRESS"):
        environment.pop(name, None)  # only the flags place the servers
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "users_grpc",
            "dev",
            "--data-dir",
            str(tmp_path / "db"),
            "--db-listen",
            "127.0.0.1:0",
            *flags,
        ],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("flag", ["--grpc-listen", "--http-listen"])
def test_a_port_taken_is_named_with_the_flag_that_moves_it(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        other = "--http-listen" if flag == "--grpc-listen" else "--grpc-listen"
        result = dev(tmp_path, flag, address, other, "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    variable = "USERS_GRPC_ADDRESS" if flag == "--grpc-listen" else "USERS_HTTP_ADDRESS"
    [said] = [line for line in result.stderr.splitlines() if line.startswith("users-grpc: ")]
    assert said.startswith(f"users-grpc: {variable}={address}: cannot listen there")
    assert said.endswith(f"; or pass {flag} with a free address")
    assert "Traceback" not in result.stderr


def test_an_address_flag_that_is_no_address_is_refused_before_anything_starts(tmp_path: Path) -> None:
    result = dev(tmp_path, "--grpc-listen", "50051")
    assert result.returncode == 2
    assert "argument --grpc-listen: '50051' must be host:port" in result.stderr
    assert not (tmp_path / "db").exists()
