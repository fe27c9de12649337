"""Mail delivery: once per mail across replicas, files when no SMTP is set, no secrets in logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.conftest import MailSink, StartServer
from tests.e2e.helpers import PASSWORD, create_request
from tests.e2e.test_operations import wait_until
from users.v1 import user_service_pb2 as pb


def test_two_replicas_deliver_each_mail_once(start_server: StartServer, mail: MailSink) -> None:
    """Replicas share one outbox: every mail arrives, none twice."""
    replicas = [start_server(), start_server()]
    for n in range(10):
        replicas[n % 2].stub.CreateUser(create_request(username=f"user{n}", email=f"user{n}@example.com"))
    for n in range(10):
        mail.wait_for(f"user{n}@example.com")
    time.sleep(1)  # time for a duplicate to arrive, were there one
    ours = [m for m in mail.messages if m["To"].startswith("user")]
    assert sorted(m["To"] for m in ours) == sorted(f"user{n}@example.com" for n in range(10))
    assert len({m["Message-ID"] for m in ours}) == 10


def test_without_smtp_mail_is_written_to_the_mail_directory(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(smtp_host=None, mail_dir=tmp_path / "mail")
    server.stub.CreateUser(create_request())
    wait_until(lambda: any((tmp_path / "mail").glob("*.eml")), what="an .eml file")
    [written] = (tmp_path / "mail").glob("*.eml")
    text = written.read_text()
    assert "To: jane@example.com" in text
    assert "your activation code is" in text


def test_logs_hold_no_secrets(server: object, mail: MailSink, caplog: pytest.LogCaptureFixture) -> None:
    """Passwords, codes and hashes never reach the logs, though every step is logged."""
    caplog.set_level(logging.DEBUG)
    stub = server.stub  # type: ignore[attr-defined]
    stub.CreateUser(create_request())
    code = mail.code_for("jane@example.com")
    stub.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code))
    stub.VerifyCredentials(pb.VerifyCredentialsRequest(identifier="jane", password=PASSWORD))
    # "mail.log" is the test's own SMTP server (aiosmtpd), which of course sees the mail.
    records = [record for record in caplog.records if record.name != "mail.log"]
    logged = "\n".join(f"{record.getMessage()} {vars(record)}" for record in records)
    assert "user activated" in logged
    for secret in (PASSWORD, code, "$2b$"):
        assert secret not in logged, [line for line in logged.splitlines() if secret in line][:1]
