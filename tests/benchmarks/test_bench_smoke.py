"""The load benchmark runs end to end: `python -m bench --smoke` prints its table with numbers.

No figure is checked: timings on a shared CI machine mean nothing; docs/benchmarks.md has the
full run's."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.paths import REPO_ROOT

ROW = re.compile(r"^\| (?P<call>[^|]+) \| (?P<rate>[\d,.]+) \(.+\) \| [\d.]+ \| [\d.]+ \| [\d,]+")


# Seconds alone; minutes on a machine busy with other work.
@pytest.mark.timeout(900)
def test_the_smoke_run_prints_a_row_of_numbers_for_every_call() -> None:
    finished = _run("bench", "--smoke", timeout=840)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = {match["call"].strip() for line in finished.stdout.splitlines() if (match := ROW.match(line))}
    assert {
        "health Check",
        "GetPublicKeys",
        "GetUser (own token)",
        "ListUsers page 1",
        "ListUsers filtered by metadata",
        "Authenticate",
        "CreateUser",
    } <= rows, finished.stdout
    assert re.search(r"GetUser at a fixed \d+ calls/s.*p99 ratio [\d.]+", finished.stdout), finished.stdout
    assert re.search(r"ListUsers filtered by metadata .* ÷ page 1, p50: [\d.]+", finished.stdout), finished.stdout
    assert re.search(r"server resident memory: \d+ MB at the start, \d+ MB after", finished.stdout), finished.stdout
    assert re.search(r"machine: \d+ cores, ", finished.stdout), finished.stdout


@pytest.mark.timeout(120)
def test_the_floor_run_prints_calls_per_second_for_each_process_count() -> None:
    finished = _run("bench.floor", "--workers", "1,2", "--seconds", "0.5", timeout=100)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rates = re.findall(r"^processes (\d): ([\d,]+), ([\d,]+) calls/s$", finished.stdout, re.MULTILINE)
    assert [count for count, *_ in rates] == ["1", "2"], finished.stdout
    assert all(int(rate.replace(",", "")) > 0 for _, *runs in rates for rate in runs), finished.stdout


def _run(module: str, *arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m module arguments`` from the checkout, its output kept."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
