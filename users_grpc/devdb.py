"""Start and stop the embedded FerretDB harness (``dbharness/``): the local and test database."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BINARY = Path("dbharness/bin/dbharness")


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


def start_dev_database(
    *, data_dir: Path | None, binary: Path | None = None, listen: str = "127.0.0.1:0"
) -> DevDatabase:
    """Start FerretDB on SQLite (``data_dir``, or a throwaway directory) and wait until it accepts connections."""
    binary = binary or Path(os.environ.get("USERS_DEV_DB_BINARY", DEFAULT_BINARY))
    if not binary.exists():
        raise DevDatabaseError(f"{binary} is missing: build it with .ci/setup (or set USERS_DEV_DB_BINARY)")
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
            code = process.wait()
            complaints.seek(0)
            said = complaints.read().decode(errors="replace").strip().splitlines()
            raise DevDatabaseError(
                f"the embedded database did not start on {listen} (exit code {code}"
                + (f": {said[-1]}" if said else "")
                + "); if another process holds that port, stop it or pass --db-listen with a free address"
            )
    return DevDatabase(process=process, uri=line.removeprefix("listening "))
