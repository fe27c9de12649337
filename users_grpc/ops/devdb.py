"""Start and stop the embedded FerretDB harness (``dbharness/``): the local and test database."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DEFAULT_BINARY = Path("dbharness/bin/dbharness")
# Beside the binary in a checkout; a wheel has neither (the harness is Go, built from source).
BUILD_SCRIPT = Path("dbharness/build")


class DevDatabaseError(RuntimeError):
    """The harness is missing or did not start."""


@dataclass
class DevDatabase:
    process: subprocess.Popen[str]
    uri: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def harness_binary() -> Path:
    return Path(os.environ.get("USERS_DEV_DB_BINARY", DEFAULT_BINARY))


def ensure_harness(announce: Callable[[str], None]) -> Path:
    """The harness binary, built from this checkout's dbharness/ first if it is missing and Go is
    here; otherwise one sentence on how to get it (a ``pip install`` brings no Go binary)."""
    binary = harness_binary()
    if binary.exists():
        return binary
    if "USERS_DEV_DB_BINARY" in os.environ:
        raise DevDatabaseError(f"USERS_DEV_DB_BINARY={binary}: no such file; build it with dbharness/build")
    if not BUILD_SCRIPT.exists():
        raise DevDatabaseError(
            f"the embedded database ({DEFAULT_BINARY}) is not here: run `users-grpc dev` in a checkout of "
            "users-grpc, where dbharness/build makes it with Go 1.24 or newer, or set USERS_DEV_DB_BINARY to a "
            "built one; or serve on your own MongoDB with `users-grpc serve` and USERS_MONGODB_URI"
        )
    if shutil.which("go") is None:
        raise DevDatabaseError(
            f"{DEFAULT_BINARY} is missing and Go is not on PATH to build it: install Go 1.24 or newer "
            "(https://go.dev/dl/) and run `users-grpc dev` again, or set USERS_DEV_DB_BINARY to a built harness"
        )
    announce(f"{DEFAULT_BINARY} is missing: building it with {BUILD_SCRIPT} (minutes the first time, once)")
    with tempfile.TemporaryFile() as output:
        # A script of the checkout, found beside the binary it builds; its output is shown only if it fails.
        done = subprocess.run(  # noqa: S603
            [str(BUILD_SCRIPT)], stdout=output, stderr=subprocess.STDOUT, check=False
        )
        if done.returncode != 0 or not binary.exists():
            raise DevDatabaseError(
                f"{BUILD_SCRIPT} failed ({_how_it_ended(done.returncode, output)}); "
                f"run {BUILD_SCRIPT} to see all it says"
            )
    return binary


def _how_it_ended(code: int, output: IO[bytes]) -> str:
    """``exit code N``, then the last line the process wrote to ``output``, if it wrote any."""
    output.seek(0)
    said = output.read().decode(errors="replace").strip().splitlines()
    return f"exit code {code}" + (f": {said[-1]}" if said else "")


def start_dev_database(
    *, data_dir: Path | None, binary: Path | None = None, listen: str = "127.0.0.1:0"
) -> DevDatabase:
    """Start FerretDB on SQLite (``data_dir``, or a throwaway directory) and wait until it accepts connections."""
    binary = binary or harness_binary()
    if not binary.exists():
        raise DevDatabaseError(f"{binary} is missing: build it with dbharness/build (or set USERS_DEV_DB_BINARY)")
    command = [str(binary), "-listen", listen]
    if data_dir is not None:
        command += ["-data-dir", str(data_dir)]
    # Its complaints go to a file, read only if it fails to start: a pipe nobody reads could fill and stall it.
    with tempfile.TemporaryFile() as complaints:
        process = subprocess.Popen(  # noqa: S603 - our own binary, arguments from our callers
            command, stdout=subprocess.PIPE, stderr=complaints, text=True
        )
        assert process.stdout is not None
        # The harness prints this line once its listener is bound: a true readiness signal.
        line = process.stdout.readline().strip()
        if not line.startswith("listening mongodb://"):
            process.kill()
            process.stdout.close()
            raise DevDatabaseError(
                f"the embedded database did not start on {listen} ({_how_it_ended(process.wait(), complaints)}); "
                "if another process holds that port, stop it or pass --db-listen with a free address"
            )
    return DevDatabase(process=process, uri=line.removeprefix("listening "))
