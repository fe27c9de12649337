"""The capacity model's script runs end to end and prints a row per population, with numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import bson

from tests.benchmarks.capacity import POPULATIONS, RECORD_REFERENCE_BYTES, index_entry_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_an_index_entry_counts_its_key_fields_and_a_record_reference() -> None:
    document = {"_id": 1, "mfa": {"state": "active"}, "role": "user"}
    key = len(bson.encode({"": "active"})) - 5 + len(bson.encode({"": "user"})) - 5
    assert index_entry_bytes(document, {"mfa.state": 1, "role": 1}) == key + RECORD_REFERENCE_BYTES
    # A missing field is indexed as null, as MongoDB does for a non-sparse index.
    assert index_entry_bytes(document, {"absent": 1}) == len(bson.encode({"": None})) - 5 + RECORD_REFERENCE_BYTES


def test_the_script_measures_a_sample_and_prints_the_model() -> None:
    environment = os.environ | {"PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.capacity", "--users", "2"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert re.search(r"sign-in [1-9]\d*, refresh [1-9]\d*, authenticated read [1-9]", run.stdout), run.stdout
    rows = [line for line in run.stdout.splitlines() if re.match(r"\s*[\d,]+\s+[\d,.]+ [KMGTP]?B\s", line)]
    assert [int(row.split()[0].replace(",", "")) for row in rows] == list(POPULATIONS), run.stdout
