"""The SMTP server the tests' servers send to (aiosmtpd, on a socket bound to port 0) and what it
received, for tests to wait on."""

from __future__ import annotations

import email
import email.policy
import re
import socket
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.support.sockets import bound_socket, port_of


class SocketController(Controller):
    """An aiosmtpd controller listening on a socket bound already (port 0, read back), so no port
    is ever released and bound again, where another process could take it in between."""

    def __init__(self, handler: Any, sock: socket.socket | None = None, **kwargs: Any) -> None:
        self.socket = sock if sock is not None else bound_socket()
        super().__init__(handler, hostname="127.0.0.1", port=port_of(self.socket), **kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self.socket, ssl=self.ssl_context)


class MailSink:
    """An aiosmtpd handler that keeps what it receives, for tests to wait on."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        # Each message as it came over the wire, for what a person or grep would see.
        self.raw: list[bytes] = []
        # The SMTP envelope's recipients (RCPT TO) of each message, in the same order.
        self.envelope_recipients: list[list[str]] = []
        # Each message's To header, read once as it arrives: a waiter reads them at every arrival,
        # and parsing the header anew each time made long waits quadratic in CPU.
        self._to: list[str] = []
        self._changed = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._changed:
            self.messages.append(message)
            self.raw.append(envelope.content)
            self.envelope_recipients.append(list(envelope.rcpt_tos))
            self._to.append(str(message["To"]))
            self._changed.notify_all()
        return "250 OK"

    def clear(self) -> None:
        with self._changed:
            self.messages.clear()
            self.raw.clear()
            self.envelope_recipients.clear()
            self._to.clear()

    def recipients_of(self, message: EmailMessage) -> list[str]:
        """The envelope recipients ``message`` was delivered to."""
        with self._changed:
            return next(rcpt for m, rcpt in zip(self.messages, self.envelope_recipients, strict=True) if m is message)

    def wait_for(self, to: str, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """The first ``count`` messages to ``to``, waiting for them to arrive."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matching = [m for m, m_to in zip(self.messages, self._to, strict=True) if m_to == to]
                if len(matching) >= count:
                    return matching[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{count} mail(s) to {to} not received; got {len(matching)}")
                self._changed.wait(remaining)

    def activation_token_for(self, to: str, nth: int = 1) -> str:
        """The long activation token of the ``nth`` mail to ``to`` (the line after "expires in N hours:")."""
        body = text_of(self.wait_for(to, nth)[nth - 1])
        match = re.search(r"expires\s+in\s+\d+\s+hours:\s+(\S+)", body)
        assert match, body
        return match.group(1)

    def code_for(self, to: str, nth: int = 1) -> str:
        """The 6-digit code of the ``nth`` mail to ``to``, in English or in the shipped German."""
        body = text_of(self.wait_for(to, nth)[nth - 1])
        match = re.search(r"(?:code is|Aktivierungscode ist) (\d{6})", body)
        assert match, body
        return match.group(1)


def text_of(message: EmailMessage) -> str:
    """The plain-text part of a mail, whether it is that part alone or multipart/alternative."""
    part = message.get_body(("plain",))
    assert isinstance(part, EmailMessage), message
    # A part of a multipart message keeps the wire's CRLFs; a whole single part does not.
    return str(part.get_content()).replace("\r\n", "\n")


def html_of(message: EmailMessage) -> str:
    """The HTML part of a multipart/alternative mail."""
    part = message.get_body(("html",))
    assert isinstance(part, EmailMessage), message
    return str(part.get_content()).replace("\r\n", "\n")


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[tuple[MailSink, int]]:
    sink = MailSink()
    controller = SocketController(sink)
    controller.start()
    yield sink, controller.port
    controller.stop()


@pytest.fixture
def dead_smtp_port() -> Iterator[int]:
    """A port where no SMTP server answers (connections are refused), held for the test."""
    with bound_socket() as sock:
        yield port_of(sock)


@pytest.fixture
def mail(smtp_server: tuple[MailSink, int]) -> MailSink:
    sink, _ = smtp_server
    sink.clear()
    return sink
