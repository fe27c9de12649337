"""The pure parts of `python -m bench --peer keycloak` (bench/peer_keycloak.py): reading wrk's
report and printing the side-by-side table. The run itself needs Keycloak and is not in CI."""

from __future__ import annotations

import pytest

from bench.peer_keycloak import HttpCall, Pair, Result, parse_wrk, table, wrk_script

# What wrk prints with wrk_script's done(): its own report, then the one JSON line.
WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.01ms    1.10ms  40.00ms   90.00%
  20000 requests in 10.00s, 9.54MB read
  Non-2xx or 3xx responses: 5
Requests/sec:   2000.00
{"requests": 20000, "duration_us": 10000000, "errors": 2, "non_2xx": 5, "p50_us": 1500, "p99_us": 12250}
"""


def test_wrks_report_gives_calls_a_second_latencies_in_ms_errors_and_cpu_per_call() -> None:
    result = parse_wrk(WRK_OUTPUT, cpu_seconds_used=2.0)
    assert result == Result(calls=20000, errors=7, per_second=2000.0, p50_ms=1.5, p99_ms=12.25, cpu_us=100.0)


def test_the_table_gives_means_of_the_rounds_each_rounds_ratio_and_our_cpu_split() -> None:
    pair = Pair(
        "reads",
        ours=[
            Result(calls=10, errors=0, per_second=100, p50_ms=2, p99_ms=10, cpu_us=900, database_us=300),
            Result(calls=10, errors=1, per_second=300, p50_ms=4, p99_ms=20, cpu_us=1100, database_us=500),
        ],
        theirs=[
            Result(calls=10, errors=0, per_second=400, p50_ms=1, p99_ms=5, cpu_us=250),
            Result(calls=10, errors=0, per_second=400, p50_ms=1, p99_ms=7, cpu_us=350),
        ],
    )
    header, rule, row = table([pair])
    assert header.count("|") == rule.count("|") == row.count("|")
    assert row == "| reads | 200 | 400 | 0.50 (0.25, 0.75) | 3.0 / 1.0 | 15.0 / 6.0 | 1,000 (600 + 400) | 300 | 1 / 0 |"


def test_the_wrk_script_quotes_each_value_as_a_lua_string_and_refuses_other_than_ascii() -> None:
    script = wrk_script([HttpCall("GET", "/users", (("Authorization", 'Bearer a"b'),))])
    assert '{"GET", "/users", {["Authorization"] = "Bearer a\\"b"}, nil},' in script
    with pytest.raises(ValueError, match="not ASCII"):
        wrk_script([HttpCall("GET", "/usérs")])
