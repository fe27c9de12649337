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


def run_dev(cwd: Path, environment: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """`users-grpc dev` in `cwd`, its database in cwd/db on a free port."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "users_grpc",
            "dev",
            "--data-dir",
            str(cwd / "db"),
            "--db-listen",
            "127.0.0.1:0",
            *flags,
        ],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def dev(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "USERS_DEV_DB_BINARY": str(HARNESS)}
    for name in ("USERS_KEY_ENCRYPTION_KEY", "USERS_GRPC_ADDRESS", "USERS_HTTP_ADDRESS"):
        environment.pop(name, None)  # only the flags place the servers
    return run_dev(tmp_path, environment, *flags)


def the_one_sentence(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [said] = [line for line in result.stderr.splitlines() if line.startswith("users-grpc: ")]
    return said


@pytest.mark.parametrize("flag", ["--grpc-listen", "--http-listen"])
def test_a_port_taken_is_named_with_the_flag_that_moves_it(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        other = "--http-listen" if flag == "--grpc-listen" else "--grpc-listen"
        result = dev(tmp_path, flag, address, other, "127.0.0.1:0")
    variable = "USERS_GRPC_ADDRESS" if flag == "--grpc-listen" else "USERS_HTTP_ADDRESS"
    said = the_one_sentence(result)
    assert said.startswith(f"users-grpc: {variable}={address}: cannot listen there")
    assert said.endswith(f"; or pass {flag} with a free address")


def test_an_address_flag_that_is_no_address_is_refused_before_anything_starts(tmp_path: Path) -> None:
    result = dev(tmp_path, "--grpc-listen", "50051")
    assert result.returncode == 2
    assert "argument --grpc-listen: '50051' must be host:port" in result.stderr
    assert not (tmp_path / "db").exists()


def dev_without_harness(cwd: Path, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`users-grpc dev` where dbharness/bin/dbharness is not built, with PATH only `path`."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PATH": str(path)}
    for name in ("USERS_DEV_DB_BINARY", "USERS_KEY_ENCRYPTION_KEY", "USERS_GRPC_ADDRESS", "USERS_HTTP_ADDRESS"):
        environment.pop(name, None)
    path.mkdir(exist_ok=True)
    return run_dev(cwd, environment, *flags)


def a_checkout_without_the_harness(tmp_path: Path, build: str) -> Path:
    checkout = tmp_path / "checkout"
    (checkout / "dbharness").mkdir(parents=True)
    script = checkout / "dbharness" / "build"
    script.write_text(f"#!/bin/sh\n{build}\n")
    script.chmod(0o755)
    return checkout


def test_without_go_dev_says_go_is_missing_and_where_to_get_it(tmp_path: Path) -> None:
    checkout = a_checkout_without_the_harness(tmp_path, "echo the build ran; exit 99")
    said = the_one_sentence(dev_without_harness(checkout, tmp_path / "bin"))
    assert said.startswith("users-grpc: dbharness/bin/dbharness is missing and Go is not on PATH to build it: ")
    assert "install Go 1.24 or newer (https://go.dev/dl/)" in said
    assert not (checkout / "db").exists()


def test_outside_a_checkout_dev_says_where_the_harness_comes_from(tmp_path: Path) -> None:
    # As after `pip install users-grpc`: no dbharness/ at all, whether Go is here or not.
    said = the_one_sentence(dev_without_harness(tmp_path, tmp_path / "bin"))
    assert said.startswith("users-grpc: the embedded database (dbharness/bin/dbharness) is not here: ")
    assert "`users-grpc serve` and USERS_MONGODB_URI" in said


def test_with_go_dev_builds_the_missing_harness_and_starts_on_it(tmp_path: Path) -> None:
    # The checkout's build script (here one that puts the real binary in place, as dbharness/build
    # does after compiling it) runs when Go is on PATH; the taken port then ends dev, after the database started.
    checkout = a_checkout_without_the_harness(
        tmp_path, f"/bin/mkdir -p dbharness/bin && /bin/ln -s {HARNESS} dbharness/bin/dbharness"
    )
    (tmp_path / "bin").mkdir()
    go = tmp_path / "bin" / "go"
    go.write_text("#!/bin/sh\nexit 1\n")
    go.chmod(0o755)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = dev_without_harness(
            checkout, tmp_path / "bin", "--grpc-listen", address, "--http-listen", "127.0.0.1:0"
        )
    assert "users-grpc dev: dbharness/bin/dbharness is missing: building it with dbharness/build" in result.stderr
    assert "users-grpc dev: database at mongodb://" in result.stderr
    assert the_one_sentence(result).startswith(f"users-grpc: USERS_GRPC_ADDRESS={address}: cannot listen there")


def test_a_harness_build_that_fails_is_said_in_one_sentence(tmp_path: Path) -> None:
    checkout = a_checkout_without_the_harness(tmp_path, "echo 'go: module lookup disabled' >&2; exit 1")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "go").symlink_to("/bin/false")
    said = the_one_sentence(dev_without_harness(checkout, tmp_path / "bin"))
    assert said == (
        "users-grpc: dbharness/build failed (exit code 1: go: module lookup disabled); "
        "run dbharness/build to see all it says"
    )


def test_a_harness_binary_set_but_absent_is_named_with_its_variable(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "USERS_DEV_DB_BINARY": str(tmp_path / "nowhere")}
    environment.pop("USERS_KEY_ENCRYPTION_KEY", None)
    said = the_one_sentence(run_dev(tmp_path, environment))
    assert (
        said == f"users-grpc: USERS_DEV_DB_BINARY={tmp_path / 'nowhere'}: no such file; build it with dbharness/build"
    )
