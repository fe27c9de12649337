"""The README's walkthrough and the docs' examples, run as written: every ```sh block marked
``<!-- runnable -->`` of the pages below, in order, in one bash (so each block goes on with the
variables of the blocks before it), against a fresh `users-grpc dev` of the test's own.

The first block that exits non-zero fails the test, named by its page and line. Every other
```sh block of README.md and docs/*.md says, right above it, why it is not run
(``<!-- not run: the reason -->``): an example nobody runs goes stale unseen."""

from __future__ import annotations

import json
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

# In the order a reader follows them: each page goes on in the README's shell.
RUNNABLE_PAGES = (
    "README.md",
    "docs/security.md",
    "docs/admin.md",
    "docs/scim.md",
    "docs/operations.md",
    "docs/releasing.md",
)
MARK = "<!-- runnable -->"
_NOT_RUN = re.compile(r"<!-- not run: \S[^\n]*? -->")
# A ```sh fence, indented as it may be in a list item, up to its closing fence at the same indent.
_BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)
_MARK_LINE = re.compile(r"^ *(<!-- runnable -->|<!-- not run: \S[^\n]*? -->)$", re.MULTILINE)
# The pages whose ```sh blocks are run or say why not: the README and every page of docs/.
PAGES = ("README.md", *sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "docs").glob("*.md")))


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    text: str
    mark: str | None  # the mark right above the fence, if any

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def sh_blocks(page: str) -> list[Block]:
    text = (REPO_ROOT / page).read_text()
    blocks = []
    for match in _BLOCK.finditer(text):
        indent, body = match.group(1), match.group(2)
        above = text[: match.start()].split("\n")[-2].strip() if match.start() else ""
        mark = above if above == MARK or _NOT_RUN.fullmatch(above) else None
        lines = [line.removeprefix(indent) for line in body.splitlines(keepends=True)]
        blocks.append(Block(page, text.count("\n", 0, match.start()) + 1, "".join(lines), mark))
    # A mark not right above a ```sh block would mark nothing, silently.
    marked = sum(block.mark is not None for block in blocks)
    assert marked == len(_MARK_LINE.findall(text)), f"{page}: a mark not right above a ```sh block"
    return blocks


def runnable_blocks(page: str) -> list[Block]:
    return [block for block in sh_blocks(page) if block.mark == MARK]


def script_of(blocks: list[Block]) -> str:
    """One bash script: each block after a line naming it, the first failure reported by name."""
    parts = ["set -Eeuo pipefail", "trap 'echo \"FAILED BLOCK: $BLOCK (line $LINENO of the script)\" >&2' ERR"]
    for block in blocks:
        parts += [f"BLOCK={block.name}", f"echo '=== {block.name}'", block.text]
    parts.append("echo '=== all blocks ran'")
    return "\n".join(parts) + "\n"


def test_every_page_with_runnable_blocks_is_run() -> None:
    marked = {page for page in PAGES if runnable_blocks(page)}
    assert marked == set(RUNNABLE_PAGES)


def test_every_sh_block_is_run_or_says_why_not() -> None:
    unmarked = [block.name for page in PAGES for block in sh_blocks(page) if block.mark is None]
    assert not unmarked, f"```sh blocks with neither {MARK} nor <!-- not run: the reason --> right above: {unmarked}"


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
    http_address: str
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


def _listening_ports(dev: subprocess.Popen[str], deadline: float) -> tuple[int, int]:
    """The gRPC and HTTP ports dev got on port 0, from its `listening` log line."""
    assert dev.stderr is not None
    for line in dev.stderr:
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("message") == "listening":
            return int(record["port"]), int(record["http_port"])
        assert time.monotonic() < deadline, "no listening line from users-grpc dev"
    raise AssertionError(f"users-grpc dev ended before it listened (exit {dev.wait()})")


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    """A fresh `users-grpc dev` in a working directory of its own (its var/db, var/mail and key),
    beside links to this checkout's files (.venv, .tools, pyproject.toml, ...): the root of the
    repository the README's blocks expect, with a var/ of its own."""
    for entry in REPO_ROOT.iterdir():
        if entry.name != "var" and not entry.name.startswith(".git"):
            (tmp_path / entry.name).symlink_to(entry)
    environment = {**_clean_environment(), "USERS_BCRYPT_ROUNDS": "10", "USERS_DEV_DB_BINARY": str(HARNESS)}
    command = [sys.executable, "-m", "users_grpc", "dev", "--db-listen", "127.0.0.1:0"]
    command += ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]
    process = subprocess.Popen(command, cwd=tmp_path, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        uri = _database_uri(process, deadline)
        port, http_port = _listening_ports(process, deadline)
        address, http_address = f"127.0.0.1:{port}", f"127.0.0.1:{http_port}"
        # Drain the rest of its log, so that a full pipe never blocks the server.
        drain = subprocess.Popen(["cat"], stdin=process.stderr, stdout=subprocess.DEVNULL)
        assert process.stderr is not None
        process.stderr.close()  # cat holds its own copy
        _wait_until_serving(address, process, deadline)
        yield Dev(address=address, http_address=http_address, mongodb_uri=uri, cwd=tmp_path)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
        if "drain" in locals():
            drain.wait(timeout=10)


def test_the_readme_and_the_docs_run_top_to_bottom(dev: Dev) -> None:
    blocks = [block for page in RUNNABLE_PAGES for block in runnable_blocks(page)]
    environment = {**_clean_environment(), "ADDR": dev.address, "HTTP_ADDR": dev.http_address}
    environment["USERS_MONGODB_URI"] = dev.mongodb_uri
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
