"""Mail delivery: once per mail across replicas, files when no SMTP is set, no secrets in logs."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from pymongo import MongoClient

from tests.support.calls import (
    PASSWORD,
    create_request,
    lines_holding,
    raw_collection,
    wait_until,
    wait_until_mail_settled,
)
from tests.support.mail import MailSink, SocketController
from tests.support.pki import issue
from tests.support.servers import StartServer
from tests.support.sockets import collect_known_leaks
from users.v1 import user_service_pb2 as pb
from users_grpc.grpc_api.logs import JsonFormatter


def test_two_replicas_deliver_each_mail_once(start_server: StartServer, mail: MailSink, mongodb_uri: str) -> None:
    """Replicas share one outbox: every mail arrives, none twice."""
    replicas = [start_server(), start_server()]
    for n in range(10):
        replicas[n % 2].stub.CreateUser(create_request(username=f"user{n}", email=f"user{n}@example.com"))
    for n in range(10):
        mail.wait_for(f"user{n}@example.com")
    with raw_collection(mongodb_uri, replicas[0].settings.mongodb_database, "outbox") as outbox:
        wait_until_mail_settled(outbox.database)
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
    # As the service writes them, extras included: LogRecord's own fields (`created`,
    # `relativeCreated`) hold six-digit numbers that match a code by chance.
    logged = "\n".join(JsonFormatter().format(record) for record in records)
    assert "user activated" in logged
    for secret in (PASSWORD, code, "$2b$"):
        assert not lines_holding(secret, logged)


class TlsMailSink(MailSink):
    """Keeps each message with whether its session was encrypted and who logged in."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[tuple[bool, bytes | None]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.append((session.ssl is not None, session.auth_data))
        return await super().handle_DATA(server, session, envelope)


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"mailer", b"relay secret")
    return AuthResult(success=ok, handled=False, auth_data=auth_data.login if ok else None)


SmtpPki = tuple[Path, ssl.SSLContext]  # the CA file clients trust, and the relay's server context


@pytest.fixture(scope="module")
def smtp_pki(tmp_path_factory: pytest.TempPathFactory) -> SmtpPki:
    ca, ca_name, ca_key = issue("mail-ca", None, ca=True)
    relay, _, _ = issue("localhost", (ca_name, ca_key))
    directory = tmp_path_factory.mktemp("smtp-pki")
    (directory / "ca.pem").write_bytes(ca.cert)
    (directory / "relay.pem").write_bytes(relay.cert)
    (directory / "relay.key").write_bytes(relay.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "relay.pem", directory / "relay.key")
    return directory / "ca.pem", context


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_mail_goes_over_tls_with_login(
    start_server: StartServer, smtp_pki: tuple[Path, ssl.SSLContext], security: str
) -> None:
    """STARTTLS (required by the relay) and implicit TLS, certificate verified, AUTH after encryption."""
    ca_file, context = smtp_pki
    sink = TlsMailSink()
    options: dict[str, Any] = {"authenticator": _authenticator, "auth_required": True, "auth_require_tls": True}
    if security == "starttls":
        controller = SocketController(sink, tls_context=context, require_starttls=True, **options)
    else:
        # aiosmtpd counts only STARTTLS as encryption for auth_require_tls (and warns when it must
        # require AUTH without it); implicit TLS is encrypted throughout, and the login is checked below.
        options.update(ssl_context=context, auth_require_tls=False, auth_required=False)
        controller = SocketController(sink, **options)
    controller.start()
    port = controller.port
    try:
        server = start_server(
            smtp_host="127.0.0.1", smtp_port=port, smtp_security=security, smtp_ca_file=ca_file,
            smtp_username="mailer", smtp_password="relay secret",
        )  # fmt: skip
        server.anonymous.CreateUser(create_request())
        assert sink.code_for("jane@example.com")
        upgraded, login = sink.sessions[0]
        assert login == b"mailer"
        # aiosmtpd records STARTTLS upgrades; an implicit-TLS port takes nothing but TLS.
        assert upgraded or security == "tls"
    finally:
        controller.stop()
        # aiosmtpd leaves the server side of a TLS session's socket open after QUIT.
        collect_known_leaks()


def test_an_untrusted_relay_certificate_gets_no_mail(
    start_server: StartServer, smtp_pki: tuple[Path, ssl.SSLContext], mongodb_uri: str
) -> None:
    """Without the relay's CA the certificate check fails: the mail waits in the outbox, not sent in clear."""
    _, context = smtp_pki
    sink = TlsMailSink()
    controller = SocketController(sink, tls_context=context, require_starttls=True)
    controller.start()
    port = controller.port
    try:
        server = start_server(smtp_port=port, smtp_security="starttls", mail_retry_seconds=60)
        server.stub.CreateUser(create_request())
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
        with client:
            outbox = client[server.settings.mongodb_database].outbox
            wait_until(lambda: outbox.count_documents({"last_error": {"$regex": "CERTIFICATE_VERIFY_FAILED"}}) == 1)
        assert sink.messages == []
    finally:
        controller.stop()
