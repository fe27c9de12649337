"""Mail transports: SMTP, and a directory of ``.eml`` files (the local default).

Both build the message the same way: address headers from parts, lines never split in a code.
"""

from __future__ import annotations

import asyncio
import email.utils
import smtplib
import ssl
import textwrap
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

from users_grpc.domain import rules
from users_grpc.domain.errors import InvalidArgument
from users_grpc.domain.model import QueuedMail

_LINE_LENGTH = 76


class SmtpTransport:
    """Delivers through an SMTP server, in a worker thread (smtplib blocks)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: str,
        username: str | None,
        password: str | None,
        sender: Address,
        timeout_seconds: float,
        ca_file: Path | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._security = security
        self._username = username
        self._password = password
        self._sender = sender
        self._timeout = timeout_seconds
        # The system's CAs, or only the given one (a private relay); certificates are always verified.
        self._ca_file = ca_file

    async def deliver(self, mail: QueuedMail) -> None:
        await asyncio.to_thread(self._deliver, _message(mail, self._sender), mail.mail.to)

    def _deliver(self, message: EmailMessage, recipient: str) -> None:
        smtp: smtplib.SMTP
        if self._security == "tls":
            smtp = smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout, context=self._tls_context())
        else:
            smtp = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        with smtp:
            if self._security == "starttls":
                smtp.starttls(context=self._tls_context())
            if self._username and self._password:
                smtp.login(self._username, self._password)
            # The envelope names the one stored address: never recipients parsed out of the headers.
            smtp.send_message(message, from_addr=self._sender.addr_spec, to_addrs=[recipient])

    def _tls_context(self) -> ssl.SSLContext:
        # Made for each delivery, so a renewed CA file is read; only when TLS is used: loading the
        # system's CAs takes tens of milliseconds, for nothing over a plain connection.
        return ssl.create_default_context(cafile=self._ca_file)


class DirectoryTransport:
    """Writes each mail as an ``.eml`` file: the local default, so codes can be read without SMTP."""

    def __init__(self, directory: Path, sender: Address) -> None:
        self._directory = directory
        self._sender = sender

    async def deliver(self, mail: QueuedMail) -> None:
        await asyncio.to_thread(self._write, mail)

    def _write(self, mail: QueuedMail) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        # Named by outbox id: a repeated delivery rewrites the same file.
        (self._directory / f"{mail.id}.eml").write_bytes(bytes(_message(mail, self._sender)))


def _message(queued: QueuedMail, sender: Address) -> EmailMessage:
    """The message, its address headers built by the standard library from parts, never pasted text."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = _recipient(queued.mail.to)
    message["Subject"] = queued.mail.subject
    message["Date"] = email.utils.formatdate(localtime=False)
    # The same id on every attempt lets receivers drop a duplicate delivery.
    message["Message-ID"] = f"<{queued.id}@users-grpc>"
    body = _wrapped(queued.mail.body)
    # Plain text that a person (or grep) copies a code or token from: never quoted-printable,
    # whose soft line breaks would split a token in two.
    message.set_content(body, cte=_transfer_encoding(body))
    if queued.mail.html is not None:
        # multipart/alternative: the text part first, then the HTML one, which clients prefer.
        html = _wrapped(queued.mail.html)
        message.add_alternative(html, subtype="html", cte=_transfer_encoding(html))
        # Not the library's "===...==" boundary, whose lines end in "=" as a quoted-printable
        # soft break does: a grep for those finds none in our mail.
        message.set_boundary(f"alternative-{queued.id}")
    return message


def _transfer_encoding(part: str) -> str:
    return "7bit" if part.isascii() else "8bit"


def _wrapped(body: str) -> str:
    """Lines of at most 76 characters (RFC 5322 asks for 78), broken only at spaces, so a code or
    token is never split: one longer than a line stands on a line of its own."""
    return "\n".join(
        textwrap.fill(line, _LINE_LENGTH, break_long_words=False, break_on_hyphens=False) if line else line
        for line in body.split("\n")
    )


def _recipient(address: str) -> Address:
    """The stored address as one header address; refused unless it is a bare address.

    New addresses are checked at registration; a list or a display name stored under older
    rules is not mailed at all (the delivery fails, and is given up after its retries).
    """
    try:
        rules.normalized_email(address)
    except InvalidArgument:
        raise ValueError("the recipient is not a bare address") from None
    local, _, domain_name = address.rpartition("@")
    return Address(username=local, domain=domain_name)
