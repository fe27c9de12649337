"""The range answer's parsing: a hit's count, padding (count 0) never a hit, and anything not of
the range format (a wrong URL's HTML page, say) an error rather than "not breached"."""

from __future__ import annotations

import pytest

from users_grpc.adapters.breached_passwords import _count_of
from users_grpc.domain.ports import BreachCheckFailed

SUFFIX = "1E4C9B93F3F0682250B6CF8331B7EE68FD8"


def test_the_count_of_a_listed_suffix_is_read_and_padding_counts_zero() -> None:
    body = f"0018A45C4D1DEF81644B54AB7F969B88D65:1\r\n{SUFFIX}:3730471\r\n00D4F6E8FA6EECAD2A3AA415EEC418D38EC:0"
    assert _count_of(SUFFIX, body) == 3730471
    assert _count_of("00D4F6E8FA6EECAD2A3AA415EEC418D38EC", body) == 0
    assert _count_of("F" * 35, body) == 0


@pytest.mark.parametrize("body", ["<html>Not found</html>", f"{SUFFIX}:many", f"{SUFFIX.lower()}:2"])
def test_an_answer_not_in_the_range_format_is_no_answer(body: str) -> None:
    with pytest.raises(BreachCheckFailed):
        _count_of(SUFFIX, body)
