"""The README's walkthrough and the docs' examples, run as written: every ```sh block marked
``<!-- runnable -->`` of the pages below, in order, in one bash (so each block goes on with the
variables of the blocks before it), against a fresh `users-grpc dev` of the test's own.

The first block that exits non-zero fails the test, named by its page and line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.support.calls import health_stub
from tests.support.paths import HARNESS, REPO_ROOT
from tests.support.sockets import free_port

# In the order a reader follows them: each page goes on in the README's shell.
RUNNABLE_PAGES = ("README.md", "docs/security.md", "docs/admin.md")
MARK = "<!-- runnable -->"
_BLOCK = re.compile(r"^<!-- runnable -->\n```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    text: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def runnable_blocks(page: str) -> list[Block]:
    text = (REPO_ROOT / page).read_text()
    blocks = [Block(page, text.count("\n", 0, match.start()) + 2, match.group(1)) for match in _BLOCK.finditer(text)]
    # A mark not followed by a ```sh block would silently run nothing.
    assert len(blocks) == text.count(MARK), f"{page}: a {MARK} mark not right above a ```sh block"
    return blocks


def script_of(blocks: list[Block]) -> str:
    """One bash script: each block after a line naming it, the first failure reported by name."""
    parts = ["set -Eeuo pipefail", "trap 'echo \"FAILED BLOCK: $BLOCK (line $LINENO of the script)\" >&2' ERR"]
    for block in blocks:
        parts += [f"BLOCK={block.name}", f"echo '=== {block.name}'", block.text]
    parts.append("echo '=== all blocks ran'")
    return "\n".join(parts) + "\n"


def test_every_page_with_runnable_blocks_is_run() -> None:
    marked = {
        str(path.relative_to(REPO_ROOT))
        for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
        if MARK in path.read_text()
    }
    assert marked == set(RUNNABLE_PAGES)


def test_the_readme_keeps_the_two_commands_in_sh_blocks() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for command in (
        ".ci/setup && .venv/bin/users-grpc dev",
        ".ci/setup && .venv/bin/coverage run -m pytest -n 2"
        " && .venv/bin/coverage combine -q && .venv/bin/coverage report",
    ):
        assert f"```sh\n{command}\n```" in readme


@dataclass(frozen=True)
class Dev:
    address: str
    mongodb_uri: str
    cwd: Path


def _clean_environment() -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("USERS_", "OTEL_"))}
    return {**environment, "PYTHONPATH": str(REPO_ROOT)}


def _wait_until_serving(address: str, dev: subprocess.Popen[str], deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_stub(channel)
        while True:
            assert dev.poll() is None, f"users-grpc dev exited: {dev.stderr.read() if dev.stderr else ''}"
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service="users.v1.UserService"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "users-grpc dev did not serve within 60 s"
            time.sleep(0.1)  # polling the health service: there is no event to await across processes


def _database_uri(dev: subprocess.Popen[str], deadline: float) -> str:
    assert dev.stderr is not None
    for line in dev.stderr:  # dev says where its database listens before it serves
        if match := re.match(r"users-grpc dev: database at (\S+)", line):
            return match.group(1)
        assert time.monotonic() < deadline, "no database address from users-grpc dev"
    raise AssertionError(f"users-grpc dev ended before its database started (exit {dev.wait()})")


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    """A fresh `users-grpc dev` in a working directory of its own (its var/db, var/mail and key),
    beside links to this checkout's .venv and .tools, as the README's blocks expect."""
    for tool in (".venv", ".tools"):
        (tmp_path / tool).symlink_to(REPO_ROOT / tool)
    address = f"127.0.0.1:{free_port()}"
    environment = {**_clean_environment(), "USERS_BCRYPT_ROUNDS": "10", "USERS_DEV_DB_BINARY": str(HARNESS)}
    command = [sys.executable, "-m", "users_grpc", "dev", "--db-listen", "127.0.0.1:0"]
    command += ["--grpc-listen", address, "--http-listen", "127.0.0.1:0"]
    process = subprocess.Popen(command, cwd=tmp_path, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        uri = _database_uri(process, deadline)
        # Drain the rest of its log, so that a full pipe never blocks the server.
        drain = subprocess.Popen(["cat"], stdin=process.stderr, stdout=subprocess.DEVNULL)
        assert process.stderr is not None
        process.stderr.close()  # cat holds its own copy
        _wait_until_serving(address, process, deadline)
        yield Dev(address=address, mongodb_uri=uri, cwd=tmp_path)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
        if "drain" in locals():
            drain.wait(timeout=10)


def test_the_readme_and_the_docs_run_top_to_bottom(dev: Dev) -> None:
    blocks = [block for page in RUNNABLE_PAGES for block in runnable_blocks(page)]
    environment = {**_clean_environment(), "ADDR": dev.address, "USERS_MONGODB_URI": dev.mongodb_uri}
    environment["USERS_BCRYPT_ROUNDS"] = "10"  # create-admin hashes as the test's dev does
    result = subprocess.run(
        ["bash", "-c", script_of(blocks)],
        cwd=dev.cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    failed = re.findall(r"FAILED BLOCK: (\S+)", result.stderr)
    output = f"stdout (end):\n{result.stdout[-3000:]}\nstderr (end):\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"block {failed[0] if failed else '?'} failed (exit {result.returncode})\n{output}"
    assert result.stdout.endswith("=== all blocks ran\n"), output
