"""Emails are bare addresses, mailed to exactly the stored address; identifiers compare after NFKC and case folding.

Through a real channel, server, database and SMTP server.
"""

from __future__ import annotations

import asyncio
from email.headerregistry import Address

import grpc
import pytest

from tests.support.calls import PASSWORD, create_request, error_info, rpc_error, stored_users, violated_fields
from tests.support.mail import MailSink
from tests.support.servers import RunningServer
from users.v1 import user_service_pb2 as pb
from users_grpc.adapters.mail_transports import SmtpTransport
from users_grpc.domain.model import Mail, QueuedMail

# The audit's four: a display name, a list, a comment, an encoded word.
AUDIT_ADDRESSES = [
    "ceo.corp.com<attacker@evil.test>",
    "postmaster,root,attacker@evil.test",
    "enA@example.test(2)",
    "=?utf-8?q?attacker=40evil=2Etest=2C_x?=@corp.test",
]
OTHER_NON_ADDRESSES = [
    "CEO <attacker@evil.test>",
    "<attacker@evil.test>",
    "enA@example.test, attacker@evil.test",
    "enA(comment)@example.test",
    '"attacker@evil.test"@example.test',
    "enA@[127.0.0.1]",
    "enA@example.test\r\nBcc: attacker@evil.test",
    " enA@example.test",
    "jäne@example.test",
    "\u212aate@example.test",
    "enA@localhost",
]


def test_an_email_is_a_bare_address_and_nothing_else(server: RunningServer, mail: MailSink, mongodb_uri: str) -> None:
    """Each of these is INVALID_ARGUMENT on email: no account, no mail to anyone."""
    server.anonymous.CreateUser(create_request(username="ena", email="enA@example.test"))
    for n, email in enumerate(AUDIT_ADDRESSES + OTHER_NON_ADDRESSES):
        error = rpc_error(server.anonymous.CreateUser, create_request(username=f"user{n}", email=email))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, email
        assert violated_fields(error) == {"email"}, email
    assert [user["email"] for user in stored_users(mongodb_uri, server.settings.mongodb_database, role="user")] == [
        "enA@example.test"
    ]
    [activation] = mail.wait_for("enA@example.test")
    assert mail.envelope_recipients == [["enA@example.test"]]
    assert mail.recipients_of(activation) == ["enA@example.test"]


def test_the_activation_mail_goes_to_exactly_the_stored_address(server: RunningServer, mail: MailSink) -> None:
    """One stored address, one envelope recipient; From and To are that address and the configured sender."""
    created = server.anonymous.CreateUser(create_request(email="Jane.Doe@Example.COM")).user
    # The domain is stored in its normalized form; the local part as given.
    assert created.email == "Jane.Doe@example.com"
    [message] = mail.wait_for("Jane.Doe@example.com")
    assert mail.recipients_of(message) == ["Jane.Doe@example.com"]
    assert message["From"] == "users-grpc <no-reply@localhost>"
    assert [(a.username, a.domain) for a in message["To"].addresses] == [("Jane.Doe", "example.com")]


def test_a_unicode_domain_is_stored_shown_and_mailed_as_its_a_label(
    server: RunningServer, mail: MailSink, mongodb_uri: str
) -> None:
    created = server.anonymous.CreateUser(create_request(email="jane@bücher.example")).user
    assert created.email == "jane@xn--bcher-kva.example"
    [stored] = stored_users(mongodb_uri, server.settings.mongodb_database, username="jane")
    assert stored["email"] == "jane@xn--bcher-kva.example"
    [message] = mail.wait_for("jane@xn--bcher-kva.example")
    assert mail.recipients_of(message) == ["jane@xn--bcher-kva.example"]

    # Either form of the domain, in any case, finds the account.
    code = mail.code_for("jane@xn--bcher-kva.example")
    activated = server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="JANE@BÜCHER.EXAMPLE", code=code))
    assert activated.user.email == "jane@xn--bcher-kva.example"
    for identifier in ("jane@bücher.example", "jane@XN--BCHER-KVA.example"):
        found = server.stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=identifier)).user
        assert (found.id, found.email) == (created.id, "jane@xn--bcher-kva.example"), identifier


def test_a_look_alike_of_a_taken_email_makes_no_second_account(server: RunningServer, mongodb_uri: str) -> None:
    """KELVIN SIGN, fullwidth letters, other cases: refused, or ALREADY_EXISTS on email; never a second account."""
    server.anonymous.CreateUser(create_request(username="kate", email="kate@example.test"))
    look_alikes = [
        "\u212aate@example.test",  # KELVIN SIGN: NFKC makes it K
        "\uff4bate@example.test",  # FULLWIDTH LATIN SMALL LETTER K
        "KATE@EXAMPLE.TEST",
        "kate@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.test",  # fullwidth EXAMPLE
        "kate@example.test\u3002",  # an ideographic full stop at the end
    ]
    for n, email in enumerate(look_alikes):
        error = rpc_error(server.anonymous.CreateUser, create_request(username=f"other{n}", email=email))
        if error.code() == grpc.StatusCode.ALREADY_EXISTS:
            assert error_info(error).metadata["field"] == "email", email
        else:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, email
            assert violated_fields(error) == {"email"}, email
    assert [user["username"] for user in stored_users(mongodb_uri, server.settings.mongodb_database, role="user")] == [
        "kate"
    ]


def test_case_and_width_variants_of_an_identifier_find_the_same_account(server: RunningServer, mail: MailSink) -> None:
    created = server.anonymous.CreateUser(create_request(username="kate", email="kate@example.test")).user
    code = mail.code_for("kate@example.test")
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="\u212aate@example.test", code=code))
    variants = [
        "\u212aate@example.test",
        "KATE@EXAMPLE.TEST",
        "kate@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test",
        "\u212aATE",
        "\uff4b\uff41\uff54\uff45",  # fullwidth kate
    ]
    for identifier in variants:
        signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier=identifier, password=PASSWORD))
        assert signed_in.user.id == created.id, identifier
        found = server.stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier=identifier)).user
        assert found.id == created.id, identifier


@pytest.mark.parametrize("stored", AUDIT_ADDRESSES[:2])
def test_the_transport_refuses_a_stored_address_that_is_not_bare(
    smtp_server: tuple[MailSink, int], mail: MailSink, stored: str
) -> None:
    """A list or display name stored before addresses were checked is mailed to nobody."""
    _, port = smtp_server
    transport = SmtpTransport(
        host="127.0.0.1", port=port, security="none", username=None, password=None,
        sender=Address("users-grpc", "no-reply", "localhost"), timeout_seconds=2.0,
    )  # fmt: skip

    def queued(to: str) -> QueuedMail:
        return QueuedMail(id="0" * 24, mail=Mail(to=to, subject="Your activation code", body="code"), attempts=1)

    with pytest.raises(ValueError, match="bare address"):
        asyncio.run(transport.deliver(queued(stored)))
    asyncio.run(transport.deliver(queued("enA@example.test")))
    assert mail.envelope_recipients == [["enA@example.test"]]
