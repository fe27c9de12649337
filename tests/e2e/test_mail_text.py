"""Mails carry no text a stranger chose: they greet by username, and names refuse line breaks.

Through a real channel, server, database and SMTP server.
"""

from __future__ import annotations

import re

import grpc

from tests.support.calls import (
    PASSWORD,
    create_request,
    reset,
    reset_token,
    rpc_error,
    stored_users,
    violated_fields,
    wait_until,
)
from tests.support.mail import MailSink, text_of
from tests.support.servers import RunningServer
from users.v1 import user_service_pb2 as pb

PHISHING_NAME = "Jane\u2028\u2028Security notice: your account is locked, confirm at https://evil.example/x"
BAD_NAMES = [
    PHISHING_NAME,
    "Jane\u2029Doe",  # PARAGRAPH SEPARATOR
    "Jane\nDoe",
    "Jane\x85Doe",  # NEXT LINE
    "Jane\u200bDoe",  # ZERO WIDTH SPACE
    "Jane\u202eeoD",  # RIGHT-TO-LEFT OVERRIDE
]


def test_names_refuse_line_breaks_and_format_characters(server: RunningServer, mongodb_uri: str) -> None:
    for field in ("first_name", "last_name"):
        for name in BAD_NAMES:
            error = rpc_error(server.anonymous.CreateUser, create_request(**{field: name}))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, name)
            assert violated_fields(error) == {field}, (field, name)
    assert stored_users(mongodb_uri, server.settings.mongodb_database, role="user") == []


def test_mails_greet_by_username_and_carry_no_name(server: RunningServer, mail: MailSink) -> None:
    """Activation, reset and the notice after a reset: none holds the first or last name."""
    server.anonymous.CreateUser(create_request(first_name="Zed", last_name="Quux"))
    code = mail.code_for("jane@example.com")
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code))
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    reset(server, reset_token(mail, "jane@example.com"))
    wait_until(lambda: len(mail.messages) >= 3, what="the notice of the reset")
    bodies = {m["Subject"]: text_of(m) for m in mail.messages}
    assert set(bodies) == {"Your activation code", "Reset your password", "Your password was reset"}
    for subject, body in bodies.items():
        assert body.splitlines()[0] == "Hello jane,", subject
        assert "Zed" not in body, subject
        assert "Quux" not in body, subject


# The README's recipe: a reset token is a user id, a dot and 43 URL-safe characters, on a line of its own.
RESET_TOKEN_LINE = re.compile(rb"^[0-9a-f]{24}\.[A-Za-z0-9_-]+$", re.MULTILINE)


def test_mails_are_plain_text_a_person_can_copy_tokens_from(server: RunningServer, mail: MailSink) -> None:
    """7bit, short lines, no quoted-printable soft breaks: a grep of the raw mail yields a whole
    reset token, and the token works."""
    server.anonymous.CreateUser(create_request())
    code = mail.code_for("jane@example.com")
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code))
    session = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    server.stub_for(session.access_token).ChangeEmail(
        pb.ChangeEmailRequest(user_id=session.user.id, new_email="jane@new.example", password=PASSWORD)
    )
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))

    def subjects() -> list[str]:
        return [m["Subject"] for m in mail.messages]

    wait_until(lambda: "Reset your password" in subjects(), what="the reset mail")
    raw_reset = mail.raw[subjects().index("Reset your password")]
    # One: the HTML part indents its copy, so the README's grep yields the token once.
    [token] = RESET_TOKEN_LINE.findall(raw_reset.replace(b"\r\n", b"\n"))
    reset(server, token.decode())
    wait_until(lambda: len(mail.messages) >= 5, what="the notice of the reset")
    for raw, message in zip(mail.raw, mail.messages, strict=True):
        # Each part (the text one, and the HTML one of a templated mail) is 7bit.
        parts = [part for part in message.walk() if not part.is_multipart()]
        assert [part["Content-Transfer-Encoding"] for part in parts] == ["7bit"] * len(parts), message["Subject"]
        lines = raw.replace(b"\r\n", b"\n").split(b"\n")
        assert max(len(line) for line in lines) <= 78, message["Subject"]
        assert b"=\n" not in raw.replace(b"\r\n", b"\n"), message["Subject"]
