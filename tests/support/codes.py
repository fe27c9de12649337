"""Wrong guesses at one-time codes that can never be right by chance."""

from __future__ import annotations


def codes_other_than(*accepted: str, count: int = 1) -> list[str]:
    """``count`` six-digit codes, none of them in ``accepted``: a fixed wrong guess such as
    "000000" is a random code's value once in a million, and the suite guesses hundreds of times."""
    return [code for code in (f"{n:06d}" for n in range(count + len(accepted))) if code not in accepted][:count]
