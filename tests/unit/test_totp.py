"""The TOTP code path against RFC 6238 Appendix B and RFC 4226 Appendix D, and its step window."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from users_grpc.services.mfa import STEP_SECONDS, accepted_step, totp

RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()


@pytest.mark.parametrize(
    ("unix_time", "code"),
    [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"), (1234567890, "89005924")],
)
def test_rfc6238_sha1_vectors(unix_time: int, code: str) -> None:
    assert totp(RFC_SECRET, unix_time // STEP_SECONDS, digits=8) == code


@pytest.mark.parametrize(("counter", "code"), [(0, "755224"), (1, "287082"), (9, "520489")])
def test_rfc4226_hotp_vectors(counter: int, code: str) -> None:
    """A TOTP code is the HOTP code of the step number."""
    assert totp(RFC_SECRET, counter) == code


class TestAcceptedStep:
    # Fixed, so that no two of the steps tried here share a code (a random secret would, once in 100,000).
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    now = datetime(2026, 1, 1, 12, 0, 15, tzinfo=UTC)
    step = int(now.timestamp()) // STEP_SECONDS

    def test_current_step_is_accepted(self) -> None:
        assert accepted_step(self.secret, totp(self.secret, self.step), self.now) == self.step

    def test_previous_step_is_accepted(self) -> None:
        """A code typed just before the step turned still works."""
        assert accepted_step(self.secret, totp(self.secret, self.step - 1), self.now) == self.step - 1

    @pytest.mark.parametrize("offset", [1, -2, 2])
    def test_other_steps_are_refused(self, offset: int) -> None:
        """Not the next step (pyotp's window would allow it), nor older ones."""
        code = totp(self.secret, self.step + offset)
        assert code not in {totp(self.secret, self.step), totp(self.secret, self.step - 1)}
        assert accepted_step(self.secret, code, self.now) is None
