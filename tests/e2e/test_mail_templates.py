"""Templated mails (issue 26): a text and an HTML part, a link beside the code when the front
end's page is set, an operator's templates, a second language, hostile names shown as typed,
and a broken template that stops the start.

Through a real channel, server, database and SMTP server.
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from tests.support.authenticator import SoftwareAuthenticator
from tests.support.calls import (
    NEW_PASSWORD,
    PASSWORD,
    create_request,
    rpc_error,
    signed_up,
    users_grpc,
    violated_fields,
)
from tests.support.mail import MailSink, html_of, text_of
from tests.support.servers import RunningServer, StartServer
from users.v1 import passkey_pb2 as pk
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb

ACTIVATION_URL = "https://app.example/activate"
HOSTILE_NAME = '<script>alert(1)</script>{{ 7*7 }}{% if true %}x{% endif %}"&'


def test_the_activation_mail_has_a_text_and_an_html_part_and_no_link_unless_set(
    server: RunningServer, mail: MailSink
) -> None:
    server.anonymous.CreateUser(create_request())
    [message] = mail.wait_for("jane@example.com")
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]
    code = mail.code_for("jane@example.com")
    token = mail.activation_token_for("jane@example.com")
    assert f"<strong>{code}</strong>" in html_of(message)
    # Indented: the README's grep for a token at the start of a line finds the text part's only.
    assert re.search(rf"^{re.escape(token)}$", html_of(message), re.MULTILINE) is None
    assert token in html_of(message)
    assert "#token=" not in text_of(message)
    assert "href" not in html_of(message)


def test_the_stray_line_break_is_gone(server: RunningServer, mail: MailSink) -> None:
    server.anonymous.CreateUser(create_request())
    text = text_of(mail.wait_for("jane@example.com")[0])
    assert "it works once\nand\n" not in text
    assert "it works once and expires in 24 hours:" in " ".join(text.split())


def test_with_an_activation_url_the_mail_carries_a_working_link(start_server: StartServer, mail: MailSink) -> None:
    server = start_server(activation_url=ACTIVATION_URL)
    server.anonymous.CreateUser(create_request())
    [message] = mail.wait_for("jane@example.com")
    token = mail.activation_token_for("jane@example.com")
    link = f"{ACTIVATION_URL}#token={token}"
    assert link in text_of(message).split("\n")
    assert f'href="{link}"' in html_of(message)
    # What the front end does with it: the fragment's token activates the account.
    fragment = re.search(re.escape(ACTIVATION_URL) + r"#token=(\S+)", text_of(message))
    assert fragment is not None
    activated = server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", token=fragment.group(1)))
    assert activated.user.is_active


def test_an_operator_template_overrides_the_shipped_one_file_by_file(
    start_server: StartServer, mail: MailSink, tmp_path: Path
) -> None:
    (tmp_path / "activation.en.subject.txt").write_text("Welcome to Example\n")
    (tmp_path / "activation.en.html").write_text("<p>Example Corp: your code is {{ code }}</p>\n")
    server = start_server(mail_templates_dir=tmp_path)
    server.anonymous.CreateUser(create_request())
    [message] = mail.wait_for("jane@example.com")
    code = mail.code_for("jane@example.com")
    assert message["Subject"] == "Welcome to Example"
    assert html_of(message).strip() == f"<p>Example Corp: your code is {code}</p>"
    # No text template of the operator's: the shipped one.
    assert text_of(message).startswith("Hello jane,\n\nyour activation code is")


def test_the_default_language_picks_its_templates_and_falls_back_to_english(
    start_server: StartServer, mail: MailSink
) -> None:
    server = start_server(mail_language="de")
    server.anonymous.CreateUser(create_request())
    [message] = mail.wait_for("jane@example.com")
    assert message["Subject"] == "Dein Aktivierungscode"
    assert text_of(message).startswith("Hallo jane,\n\ndein Aktivierungscode ist")
    assert 'lang="de"' in html_of(message)
    code = re.search(r"Aktivierungscode ist (\d{6})", text_of(message))
    assert code is not None
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code.group(1)))
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    [_, reset] = mail.wait_for("jane@example.com", 2)
    assert reset["Subject"] == "Setze dein Passwort zurück"


def test_a_users_language_picks_their_mails_with_its_primary_language_as_fallback(
    server: RunningServer, mail: MailSink
) -> None:
    created = server.anonymous.CreateUser(create_request(language_code="de-AT")).user
    assert created.language_code == "de-AT"
    [activation] = mail.wait_for("jane@example.com")
    assert activation["Subject"] == "Dein Aktivierungscode"
    code = re.search(r"Aktivierungscode ist (\d{6})", text_of(activation))
    assert code is not None
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=code.group(1)))
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    [_, reset] = mail.wait_for("jane@example.com", 2)
    assert reset["Subject"] == "Setze dein Passwort zurück"
    assert 'lang="de"' in html_of(reset)


def test_a_language_without_templates_falls_back_to_the_servers(server: RunningServer, mail: MailSink) -> None:
    server.anonymous.CreateUser(create_request(language_code="fr"))
    [activation] = mail.wait_for("jane@example.com")
    assert activation["Subject"] == "Your activation code"


def test_a_user_changes_the_language_of_their_next_mail(server: RunningServer, mail: MailSink) -> None:
    signed_in = signed_up(server, mail)
    token = (("authorization", f"Bearer {signed_in.access_token}"),)
    updated = server.anonymous.UpdateUser(
        pb.UpdateUserRequest(
            user_id=signed_in.user.id,
            user=user_pb2.User(language_code="de"),
            update_mask=field_mask_pb2.FieldMask(paths=["language_code"]),
        ),
        metadata=token,
    ).user
    assert updated.language_code == "de"
    assert server.anonymous.GetUser(pb.GetUserRequest(id=signed_in.user.id), metadata=token).user.language_code == "de"
    server.anonymous.ForgotPassword(pb.ForgotPasswordRequest(identifier="jane"))
    [_, reset] = mail.wait_for("jane@example.com", 2)
    assert reset["Subject"] == "Setze dein Passwort zurück"


def test_a_malformed_language_code_is_a_field_violation(server: RunningServer, mail: MailSink) -> None:
    for bad in ("de_DE", "deutsch!", "x", "de-" + "a" * 40):
        error = rpc_error(server.anonymous.CreateUser, create_request(language_code=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(error) == {"language_code"}
    signed_in = signed_up(server, mail)
    error = rpc_error(
        server.anonymous.UpdateUser,
        pb.UpdateUserRequest(
            user_id=signed_in.user.id,
            user=user_pb2.User(language_code="de_DE"),
            update_mask=field_mask_pb2.FieldMask(paths=["language_code"]),
        ),
        metadata=(("authorization", f"Bearer {signed_in.access_token}"),),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(error) == {"user.language_code"}


def test_a_hostile_name_is_escaped_in_html_and_literal_in_text(
    start_server: StartServer, mail: MailSink, tmp_path: Path
) -> None:
    """An operator greets by first name: what the stranger typed is never markup, never template."""
    (tmp_path / "activation.en.subject.txt").write_text("Hi {{ first_name }}\n")
    (tmp_path / "activation.en.txt").write_text("Hello {{ first_name }}, your code is {{ code }}\n")
    (tmp_path / "activation.en.html").write_text("<p>Hello {{ first_name }}, your code is {{ code }}</p>\n")
    server = start_server(mail_templates_dir=tmp_path)
    server.anonymous.CreateUser(create_request(first_name=HOSTILE_NAME))
    [message] = mail.wait_for("jane@example.com")
    assert message["Subject"] == f"Hi {HOSTILE_NAME}"
    # (The transport wraps the long line at a space.)
    assert " ".join(text_of(message).split()).startswith(f"Hello {HOSTILE_NAME}, your code is ")
    html = " ".join(html_of(message).split())
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;{{ 7*7 }}{% if true %}x{% endif %}&#34;&amp;" in html
    assert "49" not in html
    assert "49" not in text_of(message)


def test_a_broken_template_stops_the_start_with_one_sentence(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    (tmp_path / "activation.en.html").write_text("<p>{% if code %}never closed</p>\n")
    result = users_grpc(
        "serve",
        server_settings=server.settings,
        USERS_GRPC_ADDRESS="127.0.0.1:0",
        USERS_MAIL_TEMPLATES_DIR=str(tmp_path),
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "the mail template activation.en.html line 1 does not render" in line


def test_an_unknown_value_in_a_template_stops_the_start(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    (tmp_path / "activation.en.txt").write_text("Hello {{ usrname }}\n")
    result = users_grpc(
        "serve",
        server_settings=server.settings,
        USERS_GRPC_ADDRESS="127.0.0.1:0",
        USERS_MAIL_TEMPLATES_DIR=str(tmp_path),
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "activation.en.txt" in line
    assert "usrname" in line


def test_a_link_setting_must_be_https(start_server: StartServer) -> None:
    server = start_server()
    result = users_grpc(
        "serve",
        server_settings=server.settings,
        USERS_GRPC_ADDRESS="127.0.0.1:0",
        USERS_RESET_URL="http://app.example/r",
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "USERS_RESET_URL" in line
    assert "https://" in line


def signed_up_in(server: RunningServer, mail: MailSink, name: str, language: str) -> pb.AuthenticateResponse:
    """An activated, signed-in user whose mails are in ``language`` (empty: the server's)."""
    email = f"{name}@example.com"
    server.anonymous.CreateUser(create_request(username=name, email=email, language_code=language))
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier=name, code=mail.code_for(email)))
    return server.anonymous.Authenticate(pb.AuthenticateRequest(identifier=name, password=PASSWORD))


def changed_password_notice(server: RunningServer, mail: MailSink, signed_in: pb.AuthenticateResponse) -> EmailMessage:
    """ChangePassword, then the notice it sends, after the activation mail."""
    server.stub_for(signed_in.access_token).ChangePassword(
        pb.ChangePasswordRequest(
            user_id=signed_in.user.id,
            current_password=PASSWORD,
            new_password=NEW_PASSWORD,
            new_password_confirmation=NEW_PASSWORD,
        )
    )
    return mail.wait_for(signed_in.user.email, 2)[1]


def test_a_german_users_notice_arrives_in_german(server: RunningServer, mail: MailSink) -> None:
    notice = changed_password_notice(server, mail, signed_up_in(server, mail, "jane", "de"))
    assert notice["Subject"] == "Dein Passwort wurde geändert"
    assert text_of(notice).startswith("Hallo jane,\n\ndein Passwort wurde geändert, und jede Sitzung")
    assert 'lang="de"' in html_of(notice)
    assert "<p>dein Passwort wurde geändert, und jede Sitzung" in html_of(notice)


def test_a_notice_falls_back_to_the_primary_language_then_the_servers(
    server: RunningServer, start_server: StartServer, mail: MailSink
) -> None:
    regional = changed_password_notice(server, mail, signed_up_in(server, mail, "jane", "de-AT"))
    assert regional["Subject"] == "Dein Passwort wurde geändert"
    french = changed_password_notice(server, mail, signed_up_in(server, mail, "juliette", "fr"))
    assert french["Subject"] == "Your password was changed"
    assert text_of(french).startswith("Hello juliette,\n\nyour password was changed")
    german_server = start_server(mail_language="de")
    unset = changed_password_notice(german_server, mail, signed_up_in(german_server, mail, "hans", ""))
    assert unset["Subject"] == "Dein Passwort wurde geändert"


def test_a_hostile_passkey_name_or_first_name_in_a_german_notice_is_escaped_and_literal(
    start_server: StartServer, mail: MailSink, tmp_path: Path
) -> None:
    """The passkey's name (the shipped notices name it) and, in an operator's template, the first
    name: never markup, never template syntax, in either part."""
    (tmp_path / "notice.de.html").write_text(
        '{% import "notice-texts.de.txt" as words with context %}'
        "<p>Hallo {{ first_name }}</p><p>{{ words.message() }}</p>\n"
    )
    server = start_server(mail_templates_dir=tmp_path)
    server.anonymous.CreateUser(create_request(first_name=HOSTILE_NAME, language_code="de"))
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier="jane", code=mail.code_for("jane@example.com")))
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="jane", password=PASSWORD))
    stub = server.stub_for(signed_in.access_token)
    started = stub.StartPasskeyRegistration(
        pk.StartPasskeyRegistrationRequest(user_id=signed_in.user.id, password=PASSWORD)
    )
    stub.FinishPasskeyRegistration(
        pk.FinishPasskeyRegistrationRequest(
            user_id=signed_in.user.id,
            ceremony_id=started.ceremony_id,
            credential_json=SoftwareAuthenticator("ES256").register(started.options_json),
            display_name=HOSTILE_NAME,
        )
    )
    notice = mail.wait_for("jane@example.com", 2)[1]
    assert notice["Subject"] == "Ein Passkey wurde hinzugefügt"
    # Quotes and angle brackets are dropped from a passkey's name before any mail (passkeys.py).
    shown = "scriptalert(1)/script{{ 7*7 }}{% if true %}x{% endif %}&"
    assert f"der Passkey „{shown}“ wurde hinzugefügt." in " ".join(text_of(notice).split())
    html = " ".join(html_of(notice).split())
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;{{ 7*7 }}{% if true %}x{% endif %}&#34;&amp;" in html
    assert f"der Passkey „{shown.replace('&', '&amp;')}“ wurde hinzugefügt." in html
    assert "49" not in html
    assert "49" not in text_of(notice)
