"""What the suite builds (the client packages, the TypeScript client, Go tools) once per session,
however many xdist workers ask: the first worker builds into a directory the session's workers
share, behind a lock; the others wait for it and use what it built.

pytest-xdist's own recipe for "a session fixture run once" (its docs, "Making session-scoped
fixtures execute only once"), with ``fcntl.flock`` for the lock: the suite runs on Linux (and
macOS), where it is one call, so no package is needed for it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

NODE_MODULES = REPO_ROOT / ".tools" / "node_modules"
# For a test that may be the one to make a shared build, or wait for another worker making it: its
# time limit covers the build (.ci/artifacts took over 180 s on the two shared cores under load).
BUILD_TIMEOUT = pytest.mark.timeout(600)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory ``build`` filled for ``name``: built by the first worker of the session to ask.

    A build that fails leaves nothing marked done, so the next worker to ask builds again (and
    fails again, each in a test of its own) rather than using half a build.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base is a directory of the session's, shared by all
    shared = root / "built-once"
    shared.mkdir(exist_ok=True)
    target, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, by a crashed worker too
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            build(target)
            done.touch()
    return target


def compile_ts_client(directory: Path) -> None:
    """clients/ts compiled (package, examples and tests) in a copy beside the modules .ci/setup
    installed, so the work tree stays clean."""
    package = directory / "ts"
    shutil.copytree(REPO_ROOT / "clients" / "ts", package, ignore=shutil.ignore_patterns("node_modules", "dist"))
    (package / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    done = subprocess.run(
        [str(NODE_MODULES / ".bin" / "tsc"), "-p", "."], cwd=package, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def ts_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/ts compiled once for the session: its dist/ holds the package, examples and tests."""
    return built_once(tmp_path_factory, "ts-client", compile_ts_client) / "ts"
