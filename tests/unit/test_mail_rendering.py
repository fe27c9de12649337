"""The mail renderer on its own: the subject stays one line whatever a value holds, link
settings, languages, and the shipped templates' values."""

from __future__ import annotations

from pathlib import Path

import pytest

from users_grpc.adapters.mail_rendering import SHIPPED_TEMPLATES, MailLinks, TemplateMailRenderer
from users_grpc.domain.errors import ConfigError


def renderer(**links: str) -> TemplateMailRenderer:
    return TemplateMailRenderer(override_dir=None, default_language="en", links=MailLinks(**links))


def test_a_value_with_line_breaks_never_makes_a_second_header_line() -> None:
    mail = renderer().render(
        "notice",
        to="jane@example.com",
        values={"username": "jane", "first_name": "x", "subject": "Hi\r\nBcc: evil@example.com", "message": "m"},
    )
    assert mail.subject == "Hi Bcc: evil@example.com"


def test_the_email_change_link_carries_the_code_in_its_fragment() -> None:
    mail = renderer(email_change_url="https://app.example/confirm").render(
        "email-change-code",
        to="new@example.com",
        values={"username": "jane", "first_name": "J", "code": "123456", "minutes": 15},
    )
    assert "https://app.example/confirm#code=123456" in mail.body.split("\n")
    assert mail.html is not None
    assert 'href="https://app.example/confirm#code=123456"' in mail.html


def test_a_language_without_templates_falls_back_to_english() -> None:
    german = TemplateMailRenderer(override_dir=None, default_language="de", links=MailLinks())
    # Notices are written in English only (their text comes from the service).
    values: dict[str, str | int] = {"username": "jane", "first_name": "J", "subject": "S", "message": "M"}
    notice = german.render("notice", to="j@example.com", values=values, language="de")
    assert notice.html is not None
    assert 'lang="en"' in notice.html
    activation: dict[str, str | int] = {
        "username": "jane",
        "first_name": "J",
        "code": "1",
        "token": "t",
        "minutes": 5,
        "hours": 2,
    }
    assert german.render("activation", to="j@example.com", values=activation, language="fr").subject == (
        "Dein Aktivierungscode"
    )
    assert german.render("activation", to="j@example.com", values=activation, language="en").subject == (
        "Your activation code"
    )


def test_every_shipped_kind_has_its_three_english_parts() -> None:
    names = {path.name for path in SHIPPED_TEMPLATES.iterdir()}
    for kind in ("activation", "password-reset", "email-change-code", "notice"):
        assert {f"{kind}.en.subject.txt", f"{kind}.en.txt", f"{kind}.en.html"} <= names


def test_a_template_using_python_internals_is_refused_by_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "notice.en.txt").write_text("{{ message.__class__.__mro__[1].__subclasses__() }}\n")
    with pytest.raises(ConfigError, match=r"notice\.en\.txt does not render"):
        TemplateMailRenderer(override_dir=tmp_path, default_language="en", links=MailLinks())


def test_a_regional_tag_falls_back_to_its_primary_language() -> None:
    english = TemplateMailRenderer(override_dir=None, default_language="en", links=MailLinks())
    values: dict[str, str | int] = {"username": "jane", "first_name": "J", "token": "t", "minutes": 5}
    assert english.render("password-reset", to="j@example.com", values=values, language="de-AT").subject == (
        "Setze dein Passwort zurück"
    )
    assert english.render("password-reset", to="j@example.com", values=values, language="DE").subject == (
        "Setze dein Passwort zurück"
    )
